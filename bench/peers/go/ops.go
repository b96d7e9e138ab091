// The workloads of examples/ops.rs in Go, for `cargo xtask bench --peers`
// when a `go` toolchain is installed (it builds this with `go build`).
//
//	ops OP N [PROCS [go]]
//
// The same OPs, N and PROCS (GOMAXPROCS) as gokernel's ops, and the same
// last line, `result OP PROCS N VALUE UNIT go`. handoff passes a token
// through two channels of capacity 1 (a token that is kept, as unpark
// before park); handoff-chan through two unbuffered channels. switch and
// handoff-cross have no counterpart here: exit status 3.
package main

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

func goschedPair(n uint64) {
	done := make(chan struct{})
	for i := 0; i < 2; i++ {
		go func() {
			for j := uint64(0); j < n/2; j++ {
				runtime.Gosched()
			}
			done <- struct{}{}
		}()
	}
	<-done
	<-done
}

func spawnAndWait(k uint64) {
	var pending atomic.Uint64
	pending.Store(k)
	wake := make(chan struct{}, 1)
	for i := uint64(0); i < k; i++ {
		go func() {
			if pending.Add(^uint64(0)) == 0 {
				wake <- struct{}{}
			}
		}()
	}
	<-wake
}

// spawnParked starts k goroutines that each block on a channel receive
// until all have; it returns ns per goroutine from the first spawn until
// the last one blocked, then closes the channel and waits (untimed).
func spawnParked(k uint64) float64 {
	var parked, done atomic.Uint64
	ready := make(chan struct{}, 1)
	finished := make(chan struct{}, 1)
	gate := make(chan struct{})
	t := time.Now()
	for i := uint64(0); i < k; i++ {
		go func() {
			if parked.Add(1) == k {
				ready <- struct{}{}
			}
			<-gate
			if done.Add(1) == k {
				finished <- struct{}{}
			}
		}()
	}
	<-ready
	ns := float64(time.Since(t).Nanoseconds()) / float64(k)
	close(gate)
	<-finished
	return ns
}

func spawnBatches(n uint64) {
	for left := n; left > 0; {
		k := left
		if k > 1000 {
			k = 1000
		}
		left -= k
		spawnAndWait(k)
	}
}

func handoff(n uint64) {
	toPeer, toMain := make(chan struct{}, 1), make(chan struct{}, 1)
	done := make(chan struct{})
	go func() {
		for i := uint64(0); i < n/2; i++ {
			<-toPeer
			toMain <- struct{}{}
		}
		close(done)
	}()
	for i := uint64(0); i < n/2; i++ {
		toPeer <- struct{}{}
		<-toMain
	}
	<-done
}

func handoffChan(n uint64) {
	ping, pong := make(chan uint64), make(chan uint64)
	go func() {
		for v := range ping {
			pong <- v + 1
		}
	}()
	v := uint64(0)
	for i := uint64(0); i < n/2; i++ {
		ping <- v
		v = <-pong
	}
	close(ping)
	if v != n/2 {
		panic("handoff-chan: wrong value")
	}
}

func rssBytes() uint64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		panic(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			kb, _ := strconv.ParseUint(f[1], 10, 64)
			return kb * 1024
		}
	}
	panic("no VmRSS")
}

func parked(n uint64) float64 {
	before := rssBytes()
	gate := make(chan struct{})
	var waiting, finished atomic.Uint64
	done := make(chan struct{})
	for i := uint64(0); i < n; i++ {
		go func() {
			waiting.Add(1)
			<-gate
			if finished.Add(1) == n {
				close(done)
			}
		}()
	}
	for waiting.Load() < n {
		runtime.Gosched()
	}
	// Let the last ones reach their receive.
	time.Sleep(10 * time.Millisecond)
	perG := float64(rssBytes()-before) / float64(n)
	close(gate)
	<-done
	return perG
}

func work(n uint64) uint64 {
	res := make(chan uint64, 64)
	for i := uint64(0); i < 64; i++ {
		go func(x uint64) {
			for j := uint64(0); j < n/64; j++ {
				x = x*6364136223846793005 + 1442695040888963407
			}
			res <- x
		}(i)
	}
	a := uint64(0)
	for i := 0; i < 64; i++ {
		a ^= <-res
	}
	return a
}

func main() {
	a := os.Args[1:]
	if len(a) < 2 || len(a) > 4 {
		fmt.Fprintln(os.Stderr, "usage: ops OP N [PROCS [go]]")
		os.Exit(2)
	}
	op := a[0]
	n, err := strconv.ParseUint(a[1], 10, 64)
	if err != nil || n == 0 {
		fmt.Fprintln(os.Stderr, "ops: N must be a whole number > 0")
		os.Exit(2)
	}
	procs := 1
	if len(a) > 2 {
		procs, err = strconv.Atoi(a[2])
		if err != nil || procs < 1 {
			fmt.Fprintln(os.Stderr, "ops: PROCS must be a whole number > 0")
			os.Exit(2)
		}
	}
	runtime.GOMAXPROCS(procs)
	t := time.Now()
	var value float64
	unit := "ns/op"
	perOp := func() float64 { return float64(time.Since(t).Nanoseconds()) / float64(n) }
	switch op {
	case "gosched":
		goschedPair(n)
		value = perOp()
	case "spawn":
		spawnBatches(n)
		value = perOp()
	case "spawn-alive":
		spawnAndWait(n)
		value = perOp()
	case "spawn-parked":
		value = spawnParked(n)
	case "handoff":
		handoff(n)
		value = perOp()
	case "handoff-chan":
		handoffChan(n)
		value = perOp()
	case "parked":
		value, unit = parked(n), "B/G"
	case "work":
		_ = work(n)
		value, unit = time.Since(t).Seconds(), "s"
	default:
		fmt.Fprintf(os.Stderr, "ops: `%s` has no Go counterpart here\n", op)
		os.Exit(3)
	}
	fmt.Printf("result %s %d %d %.2f %s go\n", op, procs, n, value, unit)
}
