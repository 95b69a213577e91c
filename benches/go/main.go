// A minimal Go net/http server like the seed's, for `cargo bench --bench
// restarts` to compare pid-server's steady-state GET / with. Standard library
// only; the listening socket sets SO_REUSEPORT (as the seed did), through
// net.ListenConfig's Control hook.
//
//	go build -o go-pid-server . && ./go-pid-server -listen 127.0.0.1:8080
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"syscall"
)

// SO_REUSEPORT on Linux (x86, arm, riscv); the syscall package does not name
// it, and golang.org/x/sys/unix is not the standard library.
const soReusePort = 0xf

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "HOST:PORT to listen on")
	flag.Parse()

	lc := net.ListenConfig{
		Control: func(network, address string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, soReusePort, 1)
			})
			if err != nil {
				return err
			}
			return serr
		},
	}
	ln, err := lc.Listen(context.Background(), "tcp", *listen)
	if err != nil {
		log.Fatalf("listen %s: %v", *listen, err)
	}
	body := []byte(fmt.Sprintf("OK. Handled by PID: %d\n", os.Getpid()))
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write(body)
	})
	log.Printf("listening on %s as PID %d", ln.Addr(), os.Getpid())
	log.Fatal(http.Serve(ln, mux))
}
