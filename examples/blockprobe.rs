use std::time::{Duration, Instant};
fn main() {
    let rt = gokernel::Runtime::builder().procs(1).build().unwrap();
    let mut v = vec![];
    for _ in 0..20 {
        let t = Instant::now();
        rt.block_on(|| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    gokernel::spawn(|| {
                        gokernel::blocking(|| std::thread::sleep(Duration::from_millis(50)))
                    })
                })
                .collect();
            hs.into_iter().for_each(|h| h.join().unwrap());
        })
        .unwrap();
        v.push(t.elapsed().as_millis());
    }
    println!("{v:?}");
}
