package agent

import (
	"bytes"
	"context"
	"sync"

	"connectrpc.com/connect"

	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

const maxChunk = 64 << 10

type chunk struct {
	data    []byte
	replace bool
	last    bool
}

// logStreamer keeps a lease's log as numbered chunks until the completion
// is acknowledged, sends what the leader has not got, and starts over
// when a new leader has lost the live log.
type logStreamer struct {
	a       *Agent
	lease   uint64
	mu      sync.Mutex
	chunks  []chunk // chunk i has seq i
	sent    int     // chunks the leader acknowledged
	pending []byte  // not yet cut into chunks
	ended   bool    // the last chunk is queued
	sending sync.Mutex
}

func newLogStreamer(a *Agent, lease uint64) *logStreamer {
	return &logStreamer{a: a, lease: lease}
}

func (l *logStreamer) add(b []byte) {
	l.mu.Lock()
	l.pending = append(l.pending, b...)
	l.mu.Unlock()
}

func (l *logStreamer) cut() {
	for len(l.pending) > 0 {
		n := min(len(l.pending), maxChunk)
		l.chunks = append(l.chunks, chunk{data: bytes.Clone(l.pending[:n])})
		l.pending = l.pending[n:]
	}
}

// replace makes data the whole log.
func (l *logStreamer) replace(data []byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.cut()
	first := true
	for first || len(data) > 0 {
		n := min(len(data), maxChunk)
		l.chunks = append(l.chunks, chunk{data: bytes.Clone(data[:n]), replace: first})
		data, first = data[n:], false
	}
}

// all is the log as the leader will store it.
func (l *logStreamer) all() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.cut()
	var out []byte
	for _, c := range l.chunks {
		if c.replace {
			out = out[:0]
		}
		out = append(out, c.data...)
	}
	return out
}

// resend starts over from the first chunk (duplicates are ignored).
func (l *logStreamer) resend() {
	l.mu.Lock()
	l.sent = 0
	l.mu.Unlock()
}

// flush sends the chunks the leader lacks in one client stream.
func (l *logStreamer) flush(ctx context.Context, last bool) error {
	l.sending.Lock()
	defer l.sending.Unlock()
	l.mu.Lock()
	l.cut()
	if last && !l.ended {
		l.chunks = append(l.chunks, chunk{last: true})
		l.ended = true
	}
	from := l.sent
	todo := l.chunks[from:]
	l.mu.Unlock()
	if len(todo) == 0 {
		return nil
	}
	msgs := make([]*kilnv1.LogChunk, len(todo))
	for i, ch := range todo {
		msgs[i] = &kilnv1.LogChunk{LeaseId: l.lease, Seq: uint64(from + i), Data: ch.data, Replace: ch.replace, Last: ch.last}
	}
	resp, err := call(ctx, l.a, func(c kilnv1connect.AgentServiceClient) (*kilnv1.StreamLogResponse, error) {
		return SendLog(ctx, c, l.a.cred, msgs)
	})
	if err != nil {
		return err
	}
	l.mu.Lock()
	// The leader says where it is: behind us means it lost chunks.
	l.sent = min(int(resp.NextSeq), len(l.chunks))
	l.mu.Unlock()
	return nil
}

// SendLog sends a lease's log chunks in one StreamLog call (a streamCall:
// a refusal is read as it comes) and returns the leader's answer: the
// next sequence number it wants.
func SendLog(ctx context.Context, c kilnv1connect.AgentServiceClient, credential string, chunks []*kilnv1.LogChunk) (*kilnv1.StreamLogResponse, error) {
	open := func(ctx context.Context) (connect.StreamingClientConn, error) { return c.StreamLog(ctx).Conn() }
	return streamCall[kilnv1.StreamLogResponse](ctx, credential, open, func(s *streamSender) error {
		for _, m := range chunks {
			s.Send(m)
		}
		return nil
	})
}
