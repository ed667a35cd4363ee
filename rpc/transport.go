package rpc

import (
	"io"
	"net/http"
	"sync"
	"time"
)

// StreamTransport is net/http's transport, except that a streamed request
// body (ContentLength -1: a Connect client stream, such as an upload or a
// log flush, or an agent call a follower forwards) goes out in pieces as
// large as what each read of it returns, up to streamedBodyBuffer.
// net/http copies such a body through a 32 KiB buffer, so a 1 MiB upload
// chunk left as 32 HTTP/1.1 chunks of about two write calls each, and the
// coordinator read it in as many pieces; now it leaves as one. Nothing is
// held back: each piece is sent as soon as it is read, so a log line is
// not delayed behind the next. A body that writes itself out (io.WriterTo,
// such as a coordinator's streamed blob copy) is left alone.
type StreamTransport struct {
	Base http.RoundTripper // http.DefaultTransport when nil
}

// NewHTTPClient is an HTTP client for Kiln's streams: no client timeout
// (long-polls and streams carry their own deadlines), and a
// StreamTransport over an http.Transport keeping maxIdlePerHost idle
// connections per host.
func NewHTTPClient(maxIdlePerHost int) *http.Client {
	return &http.Client{Transport: &StreamTransport{Base: &http.Transport{MaxIdleConnsPerHost: maxIdlePerHost, IdleConnTimeout: time.Minute}}}
}

func (t *StreamTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	base := t.Base
	if base == nil {
		base = http.DefaultTransport
	}
	if _, writesItself := req.Body.(io.WriterTo); req.Body == nil || req.Body == http.NoBody || req.ContentLength != -1 || writesItself {
		return base.RoundTrip(req)
	}
	r := new(http.Request)
	*r = *req // a RoundTripper does not change the caller's request
	r.Body = &streamedBody{req.Body}
	return base.RoundTrip(r)
}

// streamedBody is a streamed request body that net/http copies out with
// WriteTo: each read goes out whole, from a buffer of streamedBodyBuffer
// bytes.
type streamedBody struct{ io.ReadCloser }

// MaxNarChunk is the largest zstd chunk an UploadNar message may carry:
// agents send no larger, and coordinators refuse larger.
const MaxNarChunk = 1 << 20

// streamedBodyBuffer holds an upload chunk and its envelope.
const streamedBodyBuffer = MaxNarChunk + 64<<10

var streamedBodyBuffers = sync.Pool{New: func() any { b := make([]byte, streamedBodyBuffer); return &b }}

func (b *streamedBody) WriteTo(w io.Writer) (int64, error) {
	buf := streamedBodyBuffers.Get().(*[]byte)
	defer streamedBodyBuffers.Put(buf)
	var n int64
	for {
		k, err := b.Read(*buf)
		if k > 0 {
			m, werr := w.Write((*buf)[:k])
			n += int64(m)
			if werr != nil {
				return n, werr
			}
		}
		if err == io.EOF {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}
