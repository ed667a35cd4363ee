package freeport

import (
	"net"
	"strconv"
	"testing"
)

func TestLoopbackNeverRepeatsAndStaysBelowEphemeral(t *testing.T) {
	seen := map[string]bool{}
	for range 200 {
		addr, err := Loopback(true)
		if err != nil {
			t.Fatal(err)
		}
		if seen[addr] {
			t.Fatalf("%s handed out twice", addr)
		}
		seen[addr] = true
		_, p, err := net.SplitHostPort(addr)
		if err != nil {
			t.Fatal(err)
		}
		port, _ := strconv.Atoi(p)
		if port < 10000 || port >= ephemeralLow() {
			t.Fatalf("port %d outside [10000, %d)", port, ephemeralLow())
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatalf("%s is not free: %v", addr, err)
		}
		ln.Close()
	}
}
