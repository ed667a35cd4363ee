package raftfsm

import (
	"bytes"
	"errors"
	"io"
	"runtime/debug"
	"sync"
	"testing"
)

var errSinkBroken = errors.New("sink broken")

// brokenSink accepts limit bytes, then fails every write.
type brokenSink struct {
	memSink
	limit  int
	closed bool
}

func (s *brokenSink) Write(p []byte) (int, error) {
	room := s.limit - s.Len()
	if room >= len(p) {
		return s.Buffer.Write(p)
	}
	if room > 0 {
		s.Buffer.Write(p[:room])
	}
	return max(room, 0), errSinkBroken
}

func (s *brokenSink) Close() error { s.closed = true; return nil }

// snapshotState is a state whose snapshot spans several encoding chunks
// per table and more than one bufio buffer: 60 builds of 100 steps.
func snapshotState(t *testing.T) *applier {
	a := newApplier(t)
	for b := range 60 {
		if r := a.one(submitT, fanGraph(b)); r.Err != nil {
			t.Fatal(r.Err)
		}
	}
	return a
}

func TestSnapshotIsDeterministicAndRestores(t *testing.T) {
	a := snapshotState(t)
	first := snapshotBytes(t, a.f)
	if second := snapshotBytes(t, a.f); !bytes.Equal(first, second) {
		t.Fatalf("two snapshots of one state differ (%d and %d bytes)", len(first), len(second))
	}
	if len(first) <= 1<<20 {
		t.Fatalf("snapshot of %d bytes fits one write buffer; the test needs more", len(first))
	}
	if diff := diffDumps(a.dump(), (&applier{t: t, f: restoreFrom(t, first)}).dump()); diff != "" {
		t.Fatalf("restored state differs (-want +got):\n%s", diff)
	}
}

func TestSnapshotSinkFailureCancels(t *testing.T) {
	a := snapshotState(t)
	size := len(snapshotBytes(t, a.f))
	for _, tc := range []struct {
		name  string
		limit int
	}{
		{"nothing accepted", 0},
		{"inside the header", 5},
		{"after the first buffer", 1<<20 + 10},
		{"all but the last byte", size - 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			snap, err := a.f.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			defer snap.Release()
			sink := &brokenSink{limit: tc.limit}
			if err := snap.Persist(sink); !errors.Is(err, errSinkBroken) {
				t.Fatalf("Persist = %v, want the sink's error", err)
			}
			if !sink.cancelled || sink.closed {
				t.Fatalf("sink cancelled %v, closed %v; want cancelled and not closed", sink.cancelled, sink.closed)
			}
		})
	}
}

// TestRestoreGCSetting: concurrent restores put GOGC back as it was.
func TestRestoreGCSetting(t *testing.T) {
	before := debug.SetGCPercent(123)
	defer debug.SetGCPercent(before)
	a := newApplier(t)
	a.submitNode(node("s"))
	snap := snapshotBytes(t, a.f)
	const n = 8
	var reading sync.WaitGroup // every restore is under way before any reads
	reading.Add(n)
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			r := &gatedReader{r: bytes.NewReader(snap), gate: &reading}
			errs <- New(nil).Restore(io.NopCloser(r))
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := debug.SetGCPercent(123); got != 123 {
		t.Errorf("GOGC after concurrent restores: %d, want 123", got)
	}
}

// gatedReader waits, on its first read, until every reader of its gate
// has started reading.
type gatedReader struct {
	r       io.Reader
	gate    *sync.WaitGroup
	started bool
}

func (g *gatedReader) Read(p []byte) (int, error) {
	if !g.started {
		g.started = true
		g.gate.Done()
		g.gate.Wait()
	}
	return g.r.Read(p)
}
