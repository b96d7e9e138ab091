// The Go net/http peer of examples/http.rs, for `cargo xtask http-bench`
// (and the echo peer of examples/echo.rs for the idle-connection figure):
//
//	http-go http|echo ADDR PROCS
//
// Prints "listening on ADDR" and serves until killed.
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
)

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: http-go http|echo ADDR PROCS")
		os.Exit(2)
	}
	procs, err := strconv.Atoi(os.Args[3])
	if err != nil {
		panic(err)
	}
	runtime.GOMAXPROCS(procs)
	l, err := net.Listen("tcp", os.Args[2])
	if err != nil {
		panic(err)
	}
	fmt.Printf("listening on %s\n", l.Addr())
	switch os.Args[1] {
	case "http":
		body := []byte("Hello, World!")
		h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/plain")
			w.Write(body)
		})
		panic(http.Serve(l, h))
	case "echo":
		for {
			c, err := l.Accept()
			if err != nil {
				continue
			}
			go func(c net.Conn) {
				defer c.Close()
				// A read/write loop like examples/echo.rs (io.Copy
				// would splice through a pipe pair per connection).
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						if _, err := c.Write(buf[:n]); err != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}(c)
		}
	default:
		panic("unknown mode " + os.Args[1])
	}
}
