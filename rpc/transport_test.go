package rpc

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// countingConn counts the writes made to a connection.
type countingConn struct {
	net.Conn
	writes *atomic.Int64
}

func (c countingConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

// TestStreamTransportSendsPiecesWhole streams 4 MiB, 1 MiB per write,
// over HTTP/1.1 to a real server, and counts the client's writes to the
// socket: net/http alone makes several per 32 KiB; a StreamTransport a
// few per 1 MiB piece. The server must get every byte either way.
func TestStreamTransportSendsPiecesWhole(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, err := io.Copy(io.Discard, http.MaxBytesReader(w, r.Body, 8<<20))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		_, _ = io.WriteString(w, strconv.FormatInt(n, 10))
	}))
	defer srv.Close()
	piece := bytes.Repeat([]byte("kiln"), 1<<18) // 1 MiB
	const pieces = 4
	for _, tc := range []struct {
		name      string
		wrap      func(http.RoundTripper) http.RoundTripper
		minWrites int64
		maxWrites int64
	}{
		{"net/http alone", func(rt http.RoundTripper) http.RoundTripper { return rt }, 100, 1 << 20},
		{"StreamTransport", func(rt http.RoundTripper) http.RoundTripper { return &StreamTransport{Base: rt} }, 1, 4 * pieces},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var writes atomic.Int64
			base := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				return countingConn{c, &writes}, nil
			}}
			defer base.CloseIdleConnections()
			pr, pw := io.Pipe()
			go func() {
				// Owned by the test: it ends when every piece is read,
				// or when the request's end closes the pipe.
				for range pieces {
					if _, err := pw.Write(piece); err != nil {
						return
					}
				}
				_ = pw.Close()
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL, pr)
			if err != nil {
				t.Fatal(err)
			}
			req.ContentLength = -1
			resp, err := (&http.Client{Transport: tc.wrap(base)}).Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			got, err := io.ReadAll(io.LimitReader(resp.Body, 100))
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(strconv.Itoa(pieces*len(piece)), string(got)); diff != "" {
				t.Errorf("the server's count of bytes received (-want +got):\n%s", diff)
			}
			n := writes.Load()
			t.Logf("%d writes to the socket", n)
			if n < tc.minWrites || n > tc.maxWrites {
				t.Errorf("%d writes to the socket for %d MiB, want %d to %d", n, pieces, tc.minWrites, tc.maxWrites)
			}
		})
	}
}

// TestStreamTransportHoldsNothingBack sends a piece, and only once the
// server has read it, the next: a transport that waited for more before
// sending (as a log stream must not) would never finish.
func TestStreamTransportHoldsNothingBack(t *testing.T) {
	got := make(chan string, 2)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		buf := make([]byte, 64)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				got <- string(buf[:n])
			}
			if err != nil {
				return
			}
		}
	}))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pr, pw := io.Pipe()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL, pr)
	if err != nil {
		t.Fatal(err)
	}
	req.ContentLength = -1
	done := make(chan error, 1)
	go func() {
		resp, err := (&http.Client{Transport: &StreamTransport{}}).Do(req)
		if err == nil {
			resp.Body.Close()
		}
		done <- err
	}()
	var seen []string
	for _, p := range []string{"first line\n", "second line\n"} {
		if _, err := pw.Write([]byte(p)); err != nil {
			t.Fatal(err)
		}
		select {
		case s := <-got:
			seen = append(seen, s)
		case <-ctx.Done():
			t.Fatalf("the server never got %q", p)
		}
	}
	_ = pw.Close()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"first line\n", "second line\n"}, seen); diff != "" {
		t.Errorf("pieces the server read (-want +got):\n%s", diff)
	}
}

// recordingTransport keeps the request it was given.
type recordingTransport struct{ got *http.Request }

func (r *recordingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	r.got = req
	return &http.Response{StatusCode: http.StatusNoContent, Body: http.NoBody, Request: req}, nil
}

// writerToBody is a body that writes itself out.
type writerToBody struct{ io.ReadCloser }

func (writerToBody) WriteTo(io.Writer) (int64, error) { return 0, nil }

// TestStreamTransportWrapsOnlyStreams checks which bodies a
// StreamTransport replaces, and that the caller's request keeps its own.
func TestStreamTransportWrapsOnlyStreams(t *testing.T) {
	stream := io.NopCloser(io.LimitReader(bytes.NewReader(nil), 0)) // no WriteTo
	for _, tc := range []struct {
		name    string
		body    io.ReadCloser
		length  int64
		wrapped bool
	}{
		{"streamed", stream, -1, true},
		{"known length", stream, 10, false},
		{"no body", http.NoBody, 0, false},
		{"writes itself out", writerToBody{stream}, -1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recordingTransport{}
			req, err := http.NewRequest(http.MethodPost, "http://kiln.invalid/", nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Body, req.ContentLength = tc.body, tc.length
			resp, err := (&StreamTransport{Base: rec}).RoundTrip(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			_, wrapped := rec.got.Body.(*streamedBody)
			if diff := cmp.Diff(tc.wrapped, wrapped); diff != "" {
				t.Errorf("body replaced (-want +got):\n%s", diff)
			}
			if req.Body != tc.body {
				t.Errorf("the caller's request now has body %T", req.Body)
			}
		})
	}
}
