// Package freeport picks loopback ports for tests that start processes on fixed addresses.
package freeport

import (
	"errors"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

var ports struct {
	sync.Mutex
	given map[int]bool
	rng   *rand.Rand
}

// Loopback returns 127.0.0.1:<port> with a port that was free a moment ago
// (for UDP too when udp is set). The port lies below the kernel's
// ephemeral range, so no outgoing connection and no listener on port 0
// (other tests, running at the same time) can be given it while the caller
// has not bound it yet; and this process never gets the same port twice,
// so addresses chosen for several processes before any starts differ.
func Loopback(udp bool) (string, error) {
	ports.Lock()
	defer ports.Unlock()
	if ports.given == nil {
		ports.given = map[int]bool{}
		ports.rng = rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(os.Getpid())))
	}
	lo, hi := 10000, ephemeralLow()
	for range 1000 {
		port := lo + ports.rng.IntN(hi-lo)
		if ports.given[port] {
			continue
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		ok := true
		if udp {
			u, err := net.ListenPacket("udp", addr)
			if err == nil {
				u.Close()
			}
			ok = err == nil
		}
		ln.Close()
		if ok {
			ports.given[port] = true
			return addr, nil
		}
	}
	return "", errors.New("freeport: no free loopback port below the ephemeral range")
}

// For is Loopback for a test: it fails the test when no port is found.
func For(t testing.TB, udp bool) string {
	t.Helper()
	addr, err := Loopback(udp)
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

// ephemeralLow is the bottom of the kernel's ephemeral port range.
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 11000 {
				return n
			}
		}
	}
	return 32768
}
