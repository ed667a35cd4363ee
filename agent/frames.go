package agent

import (
	"errors"
	"io"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"
)

// FrameSize is how much of a NAR goes into one zstd frame. An agent
// compresses a NAR as a run of independent frames, several at once; a
// run of frames is one valid zstd stream (Nix 2.8 substitutes it, and
// the coordinator's check reads it as one). Against one zstd stream, a
// frame this size costs 0.8% (binaries) to 2.4% (sources) of the
// compressed size (4 MiB frames cost 0.1-0.7%), and makes an ingest about
// a tenth cheaper in CPU (docs/design.md, "Measured", thirteenth
// session). A NAR no larger is one frame.
const FrameSize = 1 << 20

// frameWriter compresses what is written to it as zstd frames of up to
// FrameSize input bytes each, workers at a time, and writes the frames
// to w in order from its own goroutine. At most workers frames are
// queued or being compressed, besides the one filling and the one being
// written; Write blocks beyond that (so an upload holds at most
// 2×(workers+2) FrameSize buffers). w never fails a write: a chunkSender
// keeps its error and reports it with Err. Once it does, frames still
// queued are neither compressed nor written, and Write fails with
// errSinkFailed, so the dump feeding the writer stops.
type frameWriter struct {
	w       io.Writer
	sinkErr func() error // w's Err, when it has one
	failed  atomic.Bool  // sinkErr reported an error
	filling []byte
	jobs    chan *frameJob // to the workers
	order   chan *frameJob // to the writer, in input order
	free    chan []byte    // spent buffers
	sent    bool           // a frame has been queued
	workers sync.WaitGroup
	writer  chan struct{} // closed when the writer ends
}

type frameJob struct {
	src, out []byte
	done     chan struct{}
}

// frameWorkers is how many frames an agent compresses at once: its
// cores, between 2 (so that one frame is compressed while the previous
// one is handed on) and 4 (the agent builds too).
func frameWorkers() int { return min(max(runtime.GOMAXPROCS(0), 2), 4) }

func newFrameWriter(w io.Writer, workers int, opts ...zstd.EOption) (*frameWriter, error) {
	depth := workers
	f := &frameWriter{
		w:      w,
		jobs:   make(chan *frameJob, depth),
		order:  make(chan *frameJob, depth),
		free:   make(chan []byte, 2*depth+2),
		writer: make(chan struct{}),
	}
	encs := make([]*zstd.Encoder, workers)
	for i := range encs {
		enc, err := zstd.NewWriter(nil, append(opts, zstd.WithEncoderConcurrency(1))...)
		if err != nil {
			return nil, err
		}
		encs[i] = enc
	}
	if e, ok := w.(interface{ Err() error }); ok {
		f.sinkErr = e.Err
		f.failed.Store(e.Err() != nil)
	}
	for _, enc := range encs {
		f.workers.Add(1)
		go func() {
			defer f.workers.Done()
			for j := range f.jobs {
				if !f.failed.Load() {
					j.out = enc.EncodeAll(j.src, f.buffer(len(j.src)/2))
				}
				close(j.done)
			}
		}()
	}
	go func() {
		defer close(f.writer)
		for j := range f.order {
			<-j.done
			if !f.failed.Load() {
				_, _ = f.w.Write(j.out)
				if f.sinkErr != nil && f.sinkErr() != nil {
					f.failed.Store(true)
				}
			}
			f.recycle(j.src)
			if j.out != nil {
				f.recycle(j.out)
			}
		}
	}()
	return f, nil
}

// errSinkFailed is what Write returns once the frames' destination has
// failed.
var errSinkFailed = errors.New("the compressed stream's destination failed")

// buffer is a spent buffer, or a new one with room for n bytes.
func (f *frameWriter) buffer(n int) []byte {
	select {
	case b := <-f.free:
		return b[:0]
	default:
		return make([]byte, 0, n)
	}
}

func (f *frameWriter) recycle(b []byte) {
	select {
	case f.free <- b:
	default:
	}
}

func (f *frameWriter) Write(p []byte) (int, error) {
	if f.failed.Load() {
		return 0, errSinkFailed
	}
	n := len(p)
	for len(p) > 0 {
		if f.filling == nil {
			f.filling = f.buffer(FrameSize)
		}
		k := min(len(p), FrameSize-len(f.filling))
		f.filling = append(f.filling, p[:k]...)
		p = p[k:]
		if len(f.filling) == FrameSize {
			f.queue()
		}
	}
	return n, nil
}

// queue hands the filled frame to the workers and the writer.
func (f *frameWriter) queue() {
	j := &frameJob{src: f.filling, done: make(chan struct{})}
	f.filling = nil
	f.sent = true
	f.order <- j // first: the writer takes frames in this order
	f.jobs <- j
}

// Close compresses what is left (an empty input is one empty frame) and
// waits until every frame is written. It is called once.
func (f *frameWriter) Close() {
	if len(f.filling) > 0 || !f.sent {
		if f.filling == nil {
			f.filling = f.buffer(0)
		}
		f.queue()
	}
	close(f.jobs)
	close(f.order)
	f.workers.Wait()
	<-f.writer
}
