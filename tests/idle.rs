//! An idle runtime burns no CPU: with every goroutine parked, the Ms sleep
//! on futexes instead of spinning.
//!
//! Alone in its test binary: it measures this process's CPU time.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::process_cpu;
use gokernel::{Goroutine, Runtime};

#[test]
fn all_goroutines_parked_for_200ms_cost_under_10ms_of_cpu() {
    let rt = Runtime::builder().procs(2).build().unwrap();
    let handles: Arc<std::sync::Mutex<Vec<Goroutine>>> = Default::default();
    let ready: Arc<OnceLock<()>> = Arc::new(OnceLock::new());
    let (h2, r2) = (handles.clone(), ready.clone());
    // Park 100 goroutines (and the main one) and keep their handles.
    let main = rt.spawn(move || {
        let parked: Vec<_> = (0..100)
            .map(|_| {
                let h = h2.clone();
                gokernel::spawn(move || {
                    h.lock().unwrap().push(gokernel::current());
                    gokernel::park();
                })
            })
            .collect();
        while h2.lock().unwrap().len() < 100 {
            gokernel::gosched();
        }
        h2.lock().unwrap().push(gokernel::current());
        r2.set(()).unwrap();
        gokernel::park();
        for p in parked {
            p.join().unwrap();
        }
    });
    while ready.get().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Let the Ms notice there is nothing to do and go to sleep.
    std::thread::sleep(Duration::from_millis(50));
    let before = process_cpu();
    std::thread::sleep(Duration::from_millis(200));
    let used = process_cpu() - before;
    for g in handles.lock().unwrap().iter() {
        g.unpark();
    }
    main.join().unwrap();
    // Under Valgrind every thread is slow and serialised: CPU time means
    // nothing there.
    assert!(
        std::env::var_os("GOKERNEL_VALGRIND").is_some() || used < Duration::from_millis(10),
        "an idle runtime used {used:?} of CPU in 200 ms"
    );
}
