package cache

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"

	"github.com/kilnci/kiln/raftfsm"
)

// The narinfo fast path.
//
// Nix clients ask a binary cache for .narinfo files by the thousand (one
// per store path they might substitute, hits and misses alike), each a
// few hundred bytes. Through net/http every one of them pays for header
// maps, a request and response object, a background read goroutine and
// the mux; that costs more than the lookup. FastListener answers these
// requests straight off the connection: it reads a request, and when it
// is a plain HTTP/1.1 GET or HEAD of /cache/<hash>.narinfo it writes the
// prepared answer in one write. The first request that is anything else
// (any other path or method, a body, HTTP/1.0, an upgrade, the h2c
// preface, a header it does not parse strictly, a header over 4 KiB) is
// left unread: the connection, with the bytes already read, is handed to
// net/http through Accept, and net/http serves it from then on, with its
// own limits and errors. So the fast path only ever answers requests that
// net/http would have answered the same way.

// FastOptions bound the connections the fast path holds.
type FastOptions struct {
	// IdleTimeout is how long a connection may wait for its next request
	// (at most a second more: the deadline is pushed forward lazily).
	IdleTimeout time.Duration
	// HeaderTimeout is how long a request's header may take to arrive
	// once its first bytes have.
	HeaderTimeout time.Duration
	// WriteTimeout bounds one answer's write (a client that stops
	// reading).
	WriteTimeout time.Duration
}

const fastBufSize = 4096

// FastListener wraps a TCP listener: see the comment above. Its Accept
// returns the connections net/http is to serve.
type FastListener struct {
	ln   net.Listener
	h    *Handler
	opts FastOptions

	handoff   chan net.Conn
	acceptErr chan error
	done      chan struct{}
	close     sync.Once
	wg        sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{} // held by the fast path or waiting for Accept
}

// NewFastListener starts accepting on ln. Close stops it, closes the
// connections it still holds and waits for their goroutines.
func (h *Handler) NewFastListener(ln net.Listener, opts FastOptions) *FastListener {
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = 2 * time.Minute
	}
	if opts.HeaderTimeout <= 0 {
		opts.HeaderTimeout = 10 * time.Second
	}
	if opts.WriteTimeout <= 0 {
		opts.WriteTimeout = 30 * time.Second
	}
	f := &FastListener{
		ln: ln, h: h, opts: opts,
		handoff:   make(chan net.Conn),
		acceptErr: make(chan error, 1),
		done:      make(chan struct{}),
		conns:     map[net.Conn]struct{}{},
	}
	f.wg.Add(1)
	go f.acceptLoop()
	return f
}

// Accept returns the next connection for net/http.
func (f *FastListener) Accept() (net.Conn, error) {
	select {
	case c := <-f.handoff:
		f.untrack(c)
		return c, nil
	case err := <-f.acceptErr:
		return nil, err
	case <-f.done:
		return nil, net.ErrClosed
	}
}

// Addr is the listener's address.
func (f *FastListener) Addr() net.Addr { return f.ln.Addr() }

// Close stops accepting, closes every connection not yet given to
// net/http, and waits for the fast path's goroutines to end.
func (f *FastListener) Close() error {
	var err error
	f.close.Do(func() {
		close(f.done)
		err = f.ln.Close()
		f.mu.Lock()
		for c := range f.conns {
			_ = c.Close()
		}
		f.mu.Unlock()
		f.wg.Wait()
	})
	return err
}

func (f *FastListener) track(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	select {
	case <-f.done:
		return false
	default:
	}
	f.conns[c] = struct{}{}
	return true
}

func (f *FastListener) untrack(c net.Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
}

func (f *FastListener) acceptLoop() {
	defer f.wg.Done()
	var delay time.Duration
	for {
		c, err := f.ln.Accept()
		if err != nil {
			select {
			case <-f.done:
				return
			default:
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporary(err) {
				// Out of file descriptors and the like: back off as
				// net/http does.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				select {
				case <-time.After(delay):
					continue
				case <-f.done:
					return
				}
			}
			f.acceptErr <- err
			return
		}
		delay = 0
		if !f.track(c) {
			_ = c.Close() // closed meanwhile
			return
		}
		f.wg.Add(1)
		if tc, ok := c.(*net.TCPConn); ok {
			go f.serve(tc)
		} else {
			go f.give(c) // not TCP: straight to net/http
		}
	}
}

func isTemporary(err error) bool {
	t, ok := err.(interface{ Temporary() bool })
	return ok && t.Temporary()
}

// give hands c to Accept, or closes it when the listener closes first.
func (f *FastListener) give(c net.Conn) {
	defer f.wg.Done()
	select {
	case f.handoff <- c:
	case <-f.done:
		_ = c.Close()
	}
}

// fastConn is a state of one connection on the fast path.
type fastConn struct {
	c        *net.TCPConn
	buf      []byte
	r, w     int // unconsumed request bytes are buf[r:w]
	out      []byte
	readAt   time.Time // when the idle read deadline was last pushed
	writeAt  time.Time
	inHeader bool // the header deadline is set for a partial request
}

func (f *FastListener) serve(tc *net.TCPConn) {
	fc := &fastConn{c: tc, buf: make([]byte, fastBufSize)}
	handed := false
	defer func() {
		if !handed {
			f.untrack(tc)
			// Half-close first, so the client gets a FIN right after the
			// answer. This does not rule out a reset: if the client sent
			// bytes we never read, Close still sends RST, and a client
			// that has not yet read the answer may lose it (net/http
			// narrows that window by lingering; we close at once).
			_ = tc.CloseWrite()
			_ = tc.Close()
			f.wg.Done()
		}
	}()
	for {
		req, n, verdict := parseFast(fc.buf[fc.r:fc.w])
		switch verdict {
		case fastServe:
			switch f.answer(fc, &req) {
			case broken:
				return
			case unanswerable:
				handed = true
				f.handOff(fc)
				return
			}
			fc.r += n
			fc.inHeader = false
			if fc.r == fc.w {
				fc.r, fc.w = 0, 0
			}
			if req.close {
				return
			}
			continue
		case fastHandOff:
			handed = true
			f.handOff(fc)
			return
		}
		// fastMore: read on.
		if fc.r > 0 {
			fc.w = copy(fc.buf, fc.buf[fc.r:fc.w])
			fc.r = 0
		}
		if fc.w == len(fc.buf) {
			// A header this long is not a Nix client's narinfo request:
			// net/http decides (and enforces its own limit).
			handed = true
			f.handOff(fc)
			return
		}
		now := time.Now()
		switch {
		case fc.w > 0 && !fc.inHeader:
			fc.inHeader = true
			fc.readAt = time.Time{}
			if tc.SetReadDeadline(now.Add(f.opts.HeaderTimeout)) != nil {
				return
			}
		case fc.w == 0 && now.Sub(fc.readAt) > time.Second:
			fc.readAt = now
			if tc.SetReadDeadline(now.Add(f.opts.IdleTimeout)) != nil {
				return
			}
		}
		m, err := tc.Read(fc.buf[fc.w:])
		fc.w += m
		if err != nil && m == 0 {
			return
		}
	}
}

// handOff gives the connection, with its unanswered bytes, to net/http.
func (f *FastListener) handOff(fc *fastConn) {
	_ = fc.c.SetDeadline(time.Time{})
	hc := &handedConn{TCPConn: fc.c, prefix: fc.buf[fc.r:fc.w]}
	f.mu.Lock()
	delete(f.conns, fc.c)
	f.conns[hc] = struct{}{}
	f.mu.Unlock()
	f.give(hc)
}

// answerOutcome is what serve does after answer.
type answerOutcome int

const (
	answered     answerOutcome = iota // written: go on with the next request
	broken                            // the write failed: close
	unanswerable                      // the lookup failed unexpectedly: net/http serves the request
)

// answer writes the answer to a fast request.
func (f *FastListener) answer(fc *fastConn, req *fastRequest) answerOutcome {
	h := f.h
	rec, err := h.cfg.Index().NarInfo(string(req.hash))
	if err != nil && !errors.Is(err, raftfsm.ErrNotFound) {
		// The replica cannot answer: the handler reports it (status,
		// logging, metrics) from the request left unread.
		return unanswerable
	}
	h.cfg.Metrics.Request("narinfo", err == nil)
	out := fc.out[:0]
	if err == nil {
		p := h.narInfoText(rec)
		if req.inm != nil && string(req.inm) == p.etag[0] {
			out = appendHead(out, "304 Not Modified", req.close)
			out = appendField(out, "Cache-Control: ", p.cc[0])
			out = appendField(out, "Etag: ", p.etag[0])
			out = append(out, "\r\n"...)
		} else {
			out = appendHead(out, "200 OK", req.close)
			out = appendField(out, "Cache-Control: ", p.cc[0])
			out = appendField(out, "Content-Length: ", p.length[0])
			out = appendField(out, "Content-Type: ", p.ctype[0])
			out = appendField(out, "Etag: ", p.etag[0])
			out = append(out, "\r\n"...)
			if !req.head {
				out = append(out, p.body...)
			}
		}
	} else {
		body := jsonErrorBody(err.Error())
		out = appendHead(out, "404 Not Found", req.close)
		out = appendField(out, "Cache-Control: ", ccMiss)
		out = appendField(out, "Content-Length: ", strconv.Itoa(len(body)))
		out = appendField(out, "Content-Type: ", "application/json")
		out = appendField(out, "X-Content-Type-Options: ", "nosniff")
		out = append(out, "\r\n"...)
		if !req.head {
			out = append(out, body...)
		}
	}
	fc.out = out
	now := time.Now()
	if now.Sub(fc.writeAt) > time.Second {
		fc.writeAt = now
		if fc.c.SetWriteDeadline(now.Add(f.opts.WriteTimeout)) != nil {
			return broken
		}
	}
	if _, err := fc.c.Write(out); err != nil {
		return broken
	}
	return answered
}

func appendHead(b []byte, status string, closing bool) []byte {
	b = append(b, "HTTP/1.1 "...)
	b = append(b, status...)
	b = append(b, "\r\n"...)
	if closing {
		b = append(b, "Connection: close\r\n"...)
	}
	b = append(b, "Date: "...)
	b = append(b, httpDate()...)
	return append(b, "\r\n"...)
}

func appendField(b []byte, name, value string) []byte {
	b = append(b, name...)
	b = append(b, value...)
	return append(b, "\r\n"...)
}

// httpDate is the Date header's value, formatted once a second.
func httpDate() []byte {
	now := time.Now()
	sec := now.Unix()
	if d := cachedDate.Load(); d != nil && d.sec == sec {
		return d.text
	}
	d := &dateText{sec: sec, text: now.UTC().AppendFormat(nil, http.TimeFormat)}
	cachedDate.Store(d)
	return d.text
}

type dateText struct {
	sec  int64
	text []byte
}

var cachedDate atomic.Pointer[dateText]

// handedConn is a connection given to net/http with the bytes the fast
// path had read but not answered. Embedding *net.TCPConn keeps ReadFrom
// (sendfile for NARs) and CloseWrite.
type handedConn struct {
	*net.TCPConn
	prefix []byte
}

func (c *handedConn) Read(p []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(p, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.TCPConn.Read(p)
}

// WriteTo must not bypass Read (TCPConn's would skip the prefix).
func (c *handedConn) WriteTo(w io.Writer) (int64, error) {
	var n int64
	if len(c.prefix) > 0 {
		m, err := w.Write(c.prefix)
		n += int64(m)
		c.prefix = c.prefix[m:]
		if err != nil {
			return n, err
		}
	}
	m, err := c.TCPConn.WriteTo(w)
	return n + m, err
}

// The parser.

type fastVerdict int

const (
	fastMore    fastVerdict = iota // incomplete: read more
	fastServe                      // a narinfo GET/HEAD the fast path answers
	fastHandOff                    // anything else: net/http serves it
)

type fastRequest struct {
	head  bool
	hash  []byte // the 32-character hash part
	inm   []byte // If-None-Match, nil when absent
	close bool   // Connection: close
}

var (
	narinfoPrefix = []byte("/cache/")
	narinfoSuffix = []byte(".narinfo")
	http11        = []byte("HTTP/1.1")
)

// parseFast looks at the bytes of the next request. It answers fastServe
// (with the request and its length) only for a strictly formed HTTP/1.1
// GET or HEAD of /cache/<32 nix-base32 characters>.narinfo: exactly one
// valid Host, no body (no Content-Length, Transfer-Encoding or Expect),
// no Upgrade, at most one If-None-Match, CRLF line ends, no folded lines,
// valid field names and values. Anything else net/http is to judge.
func parseFast(b []byte) (fastRequest, int, fastVerdict) {
	var req fastRequest
	// Request line.
	eol := bytes.IndexByte(b, '\n')
	if eol < 0 {
		if len(b) >= 5 && !bytes.HasPrefix(b, []byte("GET ")) && !bytes.HasPrefix(b, []byte("HEAD ")) {
			return req, 0, fastHandOff
		}
		return req, 0, fastMore
	}
	if eol == 0 || b[eol-1] != '\r' {
		return req, 0, fastHandOff
	}
	line := b[:eol-1]
	switch {
	case bytes.HasPrefix(line, []byte("GET ")):
		line = line[4:]
	case bytes.HasPrefix(line, []byte("HEAD ")):
		req.head = true
		line = line[5:]
	default:
		return req, 0, fastHandOff
	}
	sp := bytes.IndexByte(line, ' ')
	if sp < 0 || !bytes.Equal(line[sp+1:], http11) {
		return req, 0, fastHandOff
	}
	target := line[:sp]
	if len(target) != len(narinfoPrefix)+32+len(narinfoSuffix) || !bytes.HasPrefix(target, narinfoPrefix) || !bytes.HasSuffix(target, narinfoSuffix) {
		return req, 0, fastHandOff
	}
	req.hash = target[len(narinfoPrefix) : len(narinfoPrefix)+32]
	if !validHashPartBytes(req.hash) {
		return req, 0, fastHandOff
	}
	// Header fields.
	hosts := 0
	seenINM := false
	pos := eol + 1
	for {
		rest := b[pos:]
		eol := bytes.IndexByte(rest, '\n')
		if eol < 0 {
			return req, 0, fastMore
		}
		if eol == 0 || rest[eol-1] != '\r' {
			return req, 0, fastHandOff
		}
		line := rest[:eol-1]
		pos += eol + 1
		if len(line) == 0 {
			break
		}
		colon := bytes.IndexByte(line, ':')
		if colon <= 0 {
			return req, 0, fastHandOff // no name, or a folded line
		}
		name := line[:colon]
		value := bytes.Trim(line[colon+1:], " \t")
		if !httpguts.ValidHeaderFieldName(string(name)) || !httpguts.ValidHeaderFieldValue(string(value)) {
			return req, 0, fastHandOff
		}
		switch {
		case asciiEqualFold(name, "host"):
			hosts++
			if !httpguts.ValidHostHeader(string(value)) {
				return req, 0, fastHandOff
			}
		case asciiEqualFold(name, "if-none-match"):
			if seenINM {
				return req, 0, fastHandOff
			}
			seenINM = true
			req.inm = value
		case asciiEqualFold(name, "connection"):
			for _, tok := range bytes.Split(value, []byte(",")) {
				tok = bytes.Trim(tok, " \t")
				switch {
				case asciiEqualFold(tok, "close"):
					req.close = true
				case asciiEqualFold(tok, "keep-alive"), len(tok) == 0:
				default:
					return req, 0, fastHandOff // upgrade, or hop-by-hop names
				}
			}
		case asciiEqualFold(name, "content-length"), asciiEqualFold(name, "transfer-encoding"),
			asciiEqualFold(name, "expect"), asciiEqualFold(name, "upgrade"), asciiEqualFold(name, "http2-settings"):
			return req, 0, fastHandOff
		}
	}
	if hosts != 1 {
		return req, 0, fastHandOff
	}
	return req, pos, fastServe
}

// asciiEqualFold reports whether b equals the lower-case ASCII s, ignoring case.
func asciiEqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := range len(b) {
		c := b[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != s[i] {
			return false
		}
	}
	return true
}
