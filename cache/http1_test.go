package cache_test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kilnci/kiln/cache"
	"github.com/kilnci/kiln/raftfsm"
)

// response is what a test compares of an answer: everything but Date.
type response struct {
	Status  int
	Header  http.Header
	Body    string
	HasDate bool
	Closed  bool // the server closed the connection after it
}

// exchange sends raw bytes on a new connection to addr and reads one
// answer to a request of this method.
func exchange(t *testing.T, addr, method, raw string) response {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(conn, raw); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	got := readResponse(t, br, method)
	// Closed: the next read ends (EOF) instead of timing out.
	if err := conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	_, err = br.ReadByte()
	var ne net.Error
	got.Closed = !(errors.As(err, &ne) && ne.Timeout())
	return got
}

func readResponse(t *testing.T, br *bufio.Reader, method string) response {
	t.Helper()
	resp, err := http.ReadResponse(br, &http.Request{Method: method})
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the body: %v", err)
	}
	hasDate := resp.Header.Get("Date") != ""
	resp.Header.Del("Date")
	return response{Status: resp.StatusCode, Header: resp.Header, Body: string(body), HasDate: hasDate}
}

// TestFastPathAnswersAsNetHTTP sends each request to the cache behind the
// fast path and behind net/http alone: the answers must be the same, and
// exactly the narinfo GETs and HEADs must stay on the fast path.
func TestFastPathAnswersAsNetHTTP(t *testing.T) {
	c := newTestCache(t)
	f := buildNar(t, "fastpath")
	ni := narInfoFor(f, storePath("fastpath-1"))
	c.push(t, f, ni)
	hit := ni.hashPart()
	miss := strings.Repeat("0", 32)
	etag := c.mustHeader(t, "/cache/"+hit+".narinfo", "Etag")

	get := func(target, headers string) string {
		return "GET " + target + " HTTP/1.1\r\nHost: cache.example\r\n" + headers + "\r\n"
	}
	cases := []struct {
		name   string
		method string
		raw    string
		fast   bool
		status int
	}{
		{"hit", "GET", get("/cache/"+hit+".narinfo", "User-Agent: curl/7.86 Nix/2.8.0\r\nAccept: */*\r\n"), true, 200},
		{"HEAD hit", "HEAD", "HEAD /cache/" + hit + ".narinfo HTTP/1.1\r\nHost: x\r\n\r\n", true, 200},
		{"miss", "GET", get("/cache/"+miss+".narinfo", ""), true, 404},
		{"HEAD miss", "HEAD", "HEAD /cache/" + miss + ".narinfo HTTP/1.1\r\nHost: x\r\n\r\n", true, 404},
		{"etag matches", "GET", get("/cache/"+hit+".narinfo", "If-None-Match: "+etag+"\r\n"), true, 304},
		{"etag differs", "GET", get("/cache/"+hit+".narinfo", "If-None-Match: \"other\"\r\n"), true, 200},
		{"connection close", "GET", get("/cache/"+hit+".narinfo", "Connection: close\r\n"), true, 200},
		{"header names in any case", "GET", "GET /cache/" + hit + ".narinfo HTTP/1.1\r\nhOsT: x\r\nconnection: Keep-Alive\r\nACCEPT:*/*\r\n\r\n", true, 200},

		{"nix-cache-info", "GET", get("/cache/nix-cache-info", ""), false, 200},
		{"NAR", "GET", get("/cache/"+f.url(), ""), false, 200},
		{"query string", "GET", get("/cache/"+hit+".narinfo?x=1", ""), false, 200},
		{"percent-encoded hash", "GET", get("/cache/%"+strings.ToUpper(hexByte(hit[0]))+hit[1:]+".narinfo", ""), false, 200},
		{"bad hash character", "GET", get("/cache/"+strings.Repeat("e", 32)+".narinfo", ""), false, 400},
		{"HTTP/1.0", "GET", "GET /cache/" + hit + ".narinfo HTTP/1.0\r\n\r\n", false, 200},
		{"bare LF", "GET", "GET /cache/" + hit + ".narinfo HTTP/1.1\nHost: x\n\n", false, 200},
		{"folded header", "GET", get("/cache/"+hit+".narinfo", "X-A: a\r\n b\r\n"), false, 200},
		{"no Host", "GET", "GET /cache/" + hit + ".narinfo HTTP/1.1\r\n\r\n", false, 400},
		{"two Hosts", "GET", get("/cache/"+hit+".narinfo", "Host: y\r\n"), false, 400},
		{"bad Host", "GET", "GET /cache/" + hit + ".narinfo HTTP/1.1\r\nHost: a b\r\n\r\n", false, 400},
		{"bad header name", "GET", get("/cache/"+hit+".narinfo", "X A: b\r\n"), false, 400},
		{"Content-Length 0", "GET", get("/cache/"+hit+".narinfo", "Content-Length: 0\r\n"), false, 200},
		{"chunked body", "GET", get("/cache/"+hit+".narinfo", "Transfer-Encoding: chunked\r\n") + "0\r\n\r\n", false, 200},
		{"Expect", "GET", get("/cache/"+hit+".narinfo", "Expect: 100-continue\r\n"), false, 200},
		{"upgrade", "GET", get("/cache/"+hit+".narinfo", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"), false, 200},
		{"header over 4 KiB", "GET", get("/cache/"+hit+".narinfo", "X-Pad: "+strings.Repeat("p", 5000)+"\r\n"), false, 200},
		{"two If-None-Match", "GET", get("/cache/"+hit+".narinfo", "If-None-Match: "+etag+"\r\nIf-None-Match: \"x\"\r\n"), false, 304},
		{"empty then real If-None-Match", "GET", get("/cache/"+hit+".narinfo", "If-None-Match:\r\nIf-None-Match: "+etag+"\r\n"), false, 200},
		{"PUT without credentials", "PUT", "PUT /cache/" + hit + ".narinfo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", false, 401},
		{"DELETE", "DELETE", "DELETE /cache/" + hit + ".narinfo HTTP/1.1\r\nHost: x\r\n\r\n", false, 405},
	}
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			before := c.handed.Load()
			got := exchange(t, c.srv.Listener.Addr().String(), tt.method, tt.raw)
			want := exchange(t, c.plain.Listener.Addr().String(), tt.method, tt.raw)
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("fast path answers differently from net/http (-net/http +fast):\n%s", diff)
			}
			if !got.HasDate && got.Status < 400 {
				t.Errorf("answer without a Date header")
			}
			if got.Status != tt.status {
				t.Errorf("status %d, want %d", got.Status, tt.status)
			}
			handed := waitHanded(c, before, tt.fast)
			if handed != !tt.fast {
				t.Errorf("handed to net/http: %v, want %v", handed, !tt.fast)
			}
		})
	}
}

// TestFastPathLeavesLookupFailuresToNetHTTP: when the replica cannot be
// read, the request goes to net/http, whose handler reports it.
func TestFastPathLeavesLookupFailuresToNetHTTP(t *testing.T) {
	c := newTestCache(t)
	c.idx.mu.Lock()
	c.idx.fail = fmt.Errorf("%w: the replica is being restored", raftfsm.ErrUnavailable)
	c.idx.mu.Unlock()
	raw := "GET /cache/" + strings.Repeat("0", 32) + ".narinfo HTTP/1.1\r\nHost: x\r\n\r\n"
	before := c.handed.Load()
	got := exchange(t, c.srv.Listener.Addr().String(), "GET", raw)
	want := exchange(t, c.plain.Listener.Addr().String(), "GET", raw)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("fast path answers differently from net/http (-net/http +fast):\n%s", diff)
	}
	if got.Status != http.StatusServiceUnavailable {
		t.Errorf("status %d, want 503", got.Status)
	}
	if !waitHanded(c, before, false) {
		t.Error("the request was not handed to net/http")
	}
}

// waitHanded reports whether the fast server's net/http saw a new
// connection since before. When one is expected it waits for it (the
// answer can arrive before net/http's bookkeeping of its connection).
func waitHanded(c *testCache, before int64, fast bool) bool {
	if fast {
		return c.handed.Load() != before
	}
	deadline := time.Now().Add(5 * time.Second)
	for c.handed.Load() == before && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	return c.handed.Load() != before
}

func hexByte(b byte) string {
	return string("0123456789abcdef"[b>>4]) + string("0123456789abcdef"[b&15])
}

func (c *testCache) mustHeader(t *testing.T, path, key string) string {
	t.Helper()
	resp, body := c.do(t, http.MethodGet, path, nil)
	if resp.StatusCode != http.StatusOK || resp.Header.Get(key) == "" {
		t.Fatalf("GET %s: status %d, %s %q (body %q)", path, resp.StatusCode, key, resp.Header.Get(key), body)
	}
	return resp.Header.Get(key)
}

// TestFastPathConnectionSequence sends pipelined requests on one
// connection: fast ones, then one that hands the connection to net/http,
// which must answer everything after it, bodies included.
func TestFastPathConnectionSequence(t *testing.T) {
	c := newTestCache(t)
	f := buildNar(t, "sequence")
	ni := narInfoFor(f, storePath("sequence-1"))
	c.push(t, f, ni)
	hit, miss := ni.hashPart(), strings.Repeat("1", 32)
	narinfo := c.mustStatus(t, http.StatusOK, http.MethodGet, "/cache/"+hit+".narinfo", nil)
	before := c.handed.Load()

	reqs := []struct {
		method, raw string
		status      int
		body        string // "" : not checked
	}{
		{"GET", "GET /cache/" + hit + ".narinfo HTTP/1.1\r\nHost: x\r\n\r\n", 200, string(narinfo)},
		{"GET", "GET /cache/" + miss + ".narinfo HTTP/1.1\r\nHost: x\r\n\r\n", 404, ""},
		{"HEAD", "HEAD /cache/" + hit + ".narinfo HTTP/1.1\r\nHost: x\r\n\r\n", 200, ""},
		{"GET", "GET /cache/nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n", 200, ""},
		{"GET", "GET /cache/" + hit + ".narinfo HTTP/1.1\r\nHost: x\r\n\r\n", 200, string(narinfo)},
		{"PUT", "PUT /cache/" + hit + ".narinfo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 401, ""},
		{"GET", "GET /cache/" + f.url() + " HTTP/1.1\r\nHost: x\r\n\r\n", 200, string(f.zst)},
	}
	conn, err := net.Dial("tcp", c.srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	var all bytes.Buffer
	for _, r := range reqs {
		all.WriteString(r.raw)
	}
	// First the fast requests alone (answered before the rest arrives),
	// then everything else in one write.
	first := len(reqs[0].raw) + len(reqs[1].raw) + len(reqs[2].raw)
	if _, err := conn.Write(all.Bytes()[:first]); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	for i, r := range reqs {
		if i == 3 {
			if _, err := conn.Write(all.Bytes()[first:]); err != nil {
				t.Fatal(err)
			}
		}
		got := readResponse(t, br, r.method)
		if got.Status != r.status || (r.body != "" && got.Body != r.body) {
			t.Fatalf("request %d (%.40q): status %d body %.80q, want %d %.80q", i, r.raw, got.Status, got.Body, r.status, r.body)
		}
	}
	if got := c.handed.Load() - before; got != 1 {
		t.Errorf("net/http saw %d connections, want 1 (handed over once)", got)
	}
}

// TestFastPathTimeouts: a request that stops half-way and a connection
// left idle are both closed by the server.
func TestFastPathTimeouts(t *testing.T) {
	c := newTestCache(t)
	addr := serveFast(t, c.handler(t), &http.Server{Handler: c.handler(t)},
		cache.FastOptions{HeaderTimeout: 100 * time.Millisecond, IdleTimeout: 300 * time.Millisecond})

	for _, tt := range []struct{ name, send string }{
		{"partial header", "GET /cache/" + strings.Repeat("0", 32) + ".narinfo HTTP/1.1\r\nHost: x\r\n"},
		{"idle after an answer", "GET /cache/" + strings.Repeat("0", 32) + ".narinfo HTTP/1.1\r\nHost: x\r\n\r\n"},
		{"idle before any request", ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, err := io.WriteString(conn, tt.send); err != nil {
				t.Fatal(err)
			}
			// The server must close the connection long before this.
			if err := conn.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
				t.Fatal(err)
			}
			_, err = io.Copy(io.Discard, conn)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("the server kept the connection open")
			}
		})
	}
}

// TestFastListenerClose: Close ends the connections the fast path holds
// and Accept reports the listener closed.
func TestFastListenerClose(t *testing.T) {
	c := newTestCache(t)
	h := c.handler(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fl := h.NewFastListener(ln, cache.FastOptions{})
	accepted := make(chan error, 1)
	go func() {
		_, err := fl.Accept()
		accepted <- err
	}()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(conn, "GET /cache/"+strings.Repeat("0", 32)+".narinfo HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	if got := readResponse(t, br, "GET"); got.Status != http.StatusNotFound {
		t.Fatalf("status %d, want 404", got.Status)
	}
	if err := fl.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := br.ReadByte(); err == nil {
		t.Fatal("connection still open after Close")
	} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatal("connection still open after Close (read timed out)")
	}
	select {
	case err := <-accepted:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Accept still blocked after Close")
	}
}

// TestFastPathH2C: a client speaking HTTP/2 with prior knowledge is handed
// to net/http, which serves it.
func TestFastPathH2C(t *testing.T) {
	c := newTestCache(t)
	f := buildNar(t, "h2c")
	ni := narInfoFor(f, storePath("h2c-1"))
	c.push(t, f, ni)
	want := c.mustStatus(t, http.StatusOK, http.MethodGet, "/cache/"+ni.hashPart()+".narinfo", nil)

	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	addr := serveFast(t, c.handler(t), &http.Server{Handler: c.handler(t), Protocols: &protocols}, cache.FastOptions{})

	var h2 http.Protocols
	h2.SetUnencryptedHTTP2(true)
	client := &http.Client{Transport: &http.Transport{Protocols: &h2}, Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + addr + "/cache/" + ni.hashPart() + ".narinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.ProtoMajor != 2 || resp.StatusCode != http.StatusOK || !bytes.Equal(body, want) {
		t.Fatalf("%s %d %q, want HTTP/2 200 %q", resp.Proto, resp.StatusCode, body, want)
	}
}

// serveFast serves srv behind h's fast path on a loopback port until the
// test ends, and returns the address.
func serveFast(t *testing.T, h *cache.Handler, srv *http.Server, opts cache.FastOptions) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(h.NewFastListener(ln, opts)) }()
	t.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().String()
}

// handler is the cache handler behind c's servers.
func (c *testCache) handler(t *testing.T) *cache.Handler {
	t.Helper()
	h, ok := c.plain.Config.Handler.(*cache.Handler)
	if !ok {
		t.Fatalf("test cache's handler is a %T", c.plain.Config.Handler)
	}
	return h
}

// FuzzParseFast: whatever the fast path's parser accepts, net/http reads
// as the same request (method, target, Host, If-None-Match, Connection:
// close, no body); and it never claims more bytes than it was given.
func FuzzParseFast(f *testing.F) {
	hash := strings.Repeat("a", 32)
	for _, seed := range []string{
		"GET /cache/" + hash + ".narinfo HTTP/1.1\r\nHost: x\r\n\r\n",
		"HEAD /cache/" + hash + ".narinfo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nIf-None-Match: \"abc\"\r\n\r\n",
		"GET /cache/" + hash + ".narinfo HTTP/1.1\r\nhost:x\r\nconnection: keep-alive, close\r\n\r\nGET /",
		"GET /cache/" + hash + ".narinfo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na",
		"GET /cache/" + hash + ".narinfo HTTP/1.1\nHost: x\n\n",
		"GET /cache/" + hash + ".narinfo HTTP/1.1\r\nHost: x\r\n y\r\n\r\n",
		"GET /cache/" + hash + ".narinfo HTTP/1.1\r\nHost: x\r\nX\x00: y\r\n\r\n",
		"GET /cache/" + hash + ".narinfo HTTP/1.1\r\nHost: x\r\nX: \x7f\r\n\r\n",
		"GET /cache/" + hash + ".narinfo  HTTP/1.1\r\nHost: x\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
		"GET /cache/" + hash + ".narinfo HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p := cache.ParseFast(b)
		if p.N > len(b) || p.N < 0 {
			t.Fatalf("parser claims %d bytes of %d", p.N, len(b))
		}
		if p.Verdict != "serve" {
			return
		}
		req, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(b[:p.N])))
		if err != nil {
			t.Fatalf("fast path serves %q, net/http cannot read it: %v", b[:p.N], err)
		}
		wantMethod := "GET"
		if p.Head {
			wantMethod = "HEAD"
		}
		hosts := req.Header.Values("Host")
		inm := req.Header.Values("If-None-Match")
		switch {
		case req.Method != wantMethod, req.RequestURI != "/cache/"+p.Hash+".narinfo", req.URL.RawQuery != "":
			t.Fatalf("fast path reads %s %s, net/http %s %s", wantMethod, p.Hash, req.Method, req.RequestURI)
		case req.Proto != "HTTP/1.1", req.ContentLength != 0, len(req.TransferEncoding) != 0:
			t.Fatalf("fast path serves %q: proto %s, content length %d, transfer encoding %v", b[:p.N], req.Proto, req.ContentLength, req.TransferEncoding)
		case len(hosts) > 0:
			// ReadRequest moves the one Host into req.Host (an empty one
			// is valid, as net/http's server agrees).
			t.Fatalf("fast path serves %q: Host %q, more %v", b[:p.N], req.Host, hosts)
		case req.Close != p.Close:
			t.Fatalf("fast path close=%v, net/http %v for %q", p.Close, req.Close, b[:p.N])
		case (p.INM == nil) != (len(inm) == 0) || p.INM != nil && (len(inm) != 1 || inm[0] != *p.INM):
			t.Fatalf("fast path If-None-Match %v, net/http %q", p.INM, inm)
		case req.Header.Get("Upgrade") != "" || req.Header.Get("Expect") != "":
			t.Fatalf("fast path serves an upgrade or expectation: %q", b[:p.N])
		}
	})
}
