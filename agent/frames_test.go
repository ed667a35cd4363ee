package agent

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/nar"
)

// frameCount counts the zstd frames of a stream by walking their block
// headers (anything else in it, skippable frames too, fails the test).
func frameCount(t *testing.T, b []byte) int {
	t.Helper()
	n := 0
	for ; len(b) > 0; n++ {
		if len(b) < 6 || binary.LittleEndian.Uint32(b) != 0xFD2FB528 {
			t.Fatalf("frame %d: no zstd magic", n)
		}
		fhd := b[4]
		single := fhd>>5&1 == 1
		fcsSize := [4]int{0, 2, 4, 8}[fhd>>6]
		if fcsSize == 0 && single {
			fcsSize = 1
		}
		off := 5 + [4]int{0, 1, 2, 4}[fhd&3] + fcsSize // dictionary ID, content size
		if !single {
			off++ // window descriptor
		}
		for last := false; !last; {
			if off+3 > len(b) {
				t.Fatalf("frame %d: truncated", n)
			}
			bh := uint32(b[off]) | uint32(b[off+1])<<8 | uint32(b[off+2])<<16
			size := int(bh >> 3)
			if bh>>1&3 == 1 { // RLE: one byte
				size = 1
			}
			last = bh&1 == 1
			off += 3 + size
		}
		if fhd>>2&1 == 1 {
			off += 4 // content checksum
		}
		if off > len(b) {
			t.Fatalf("frame %d: truncated", n)
		}
		b = b[off:]
	}
	return n
}

func TestFrameWriter(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	random := make([]byte, 3*FrameSize+12345)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	for _, tc := range []struct {
		name    string
		size    int
		writes  int // the input in this many writes
		workers int
		frames  int
	}{
		{"empty", 0, 1, 2, 1},
		{"one byte", 1, 1, 2, 1},
		{"under one frame", FrameSize - 1, 3, 2, 1},
		{"one frame exactly", FrameSize, 1, 2, 1},
		{"one frame and a byte", FrameSize + 1, 7, 2, 2},
		{"three frames and a bit, one worker", len(random), 1, 1, 4},
		{"three frames and a bit, byte by byte chunks", len(random), 1000, 4, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := random[:tc.size]
			var out bytes.Buffer
			fw, err := newFrameWriter(&out, tc.workers, NarEncoderOptions()...)
			if err != nil {
				t.Fatal(err)
			}
			step := max(1, (len(in)+tc.writes-1)/tc.writes)
			for p := in; len(p) > 0; {
				k := min(step, len(p))
				buf := bytes.Clone(p[:k])
				if n, err := fw.Write(buf); n != k || err != nil {
					t.Fatalf("Write: %d, %v", n, err)
				}
				clear(buf) // the writer must not keep what it was given
				p = p[k:]
			}
			fw.Close()
			if got := frameCount(t, out.Bytes()); got != tc.frames {
				t.Errorf("%d frames, want %d", got, tc.frames)
			}
			dec, err := zstd.NewReader(bytes.NewReader(out.Bytes()))
			if err != nil {
				t.Fatal(err)
			}
			defer dec.Close()
			got, err := io.ReadAll(dec)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, in) {
				t.Errorf("decompressed %d bytes, not the %d written", len(got), len(in))
			}
		})
	}
}

// BenchmarkCompressNar compresses a NAR of Go's tools (binaries) and of
// its standard library's sources (text) the way agents did before
// (klauspost's streaming encoder, which finds the matches of one block at
// a time) and as independent frames (frameWriter, frameWorkers at once),
// and reports each one's MB/s, compressed size, and the ratios of the two.
func BenchmarkCompressNar(b *testing.B) {
	root := runtime.GOROOT()
	for _, tc := range []struct{ name, dir string }{
		{"binaries", filepath.Join(root, "pkg", "tool")},
		{"sources", filepath.Join(root, "src")},
	} {
		b.Run(tc.name, func(b *testing.B) {
			if _, err := os.Stat(tc.dir); err != nil {
				b.Skip(err)
			}
			var n bytes.Buffer
			if err := nar.DumpPath(&n, tc.dir); err != nil {
				b.Fatal(err)
			}
			in := n.Bytes()
			stream := func(w io.Writer) {
				enc, err := zstd.NewWriter(w, append(NarEncoderOptions(), zstd.WithEncoderConcurrency(2))...)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := enc.Write(in); err != nil {
					b.Fatal(err)
				}
				if err := enc.Close(); err != nil {
					b.Fatal(err)
				}
			}
			frames := func(w io.Writer) {
				fw, err := newFrameWriter(w, frameWorkers(), NarEncoderOptions()...)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := fw.Write(in); err != nil {
					b.Fatal(err)
				}
				fw.Close()
			}
			// Alternate the two; keep each one's best time.
			var best [2]time.Duration
			var size [2]int
			for b.Loop() {
				for i, f := range []func(io.Writer){stream, frames} {
					var out bytes.Buffer
					out.Grow(len(in))
					t0 := time.Now()
					f(&out)
					if d := time.Since(t0); best[i] == 0 || d < best[i] {
						best[i] = d
					}
					size[i] = out.Len()
				}
			}
			mbps := func(d time.Duration) float64 { return float64(len(in)) / (1 << 20) / d.Seconds() }
			b.ReportMetric(float64(len(in))/(1<<20), "nar-MiB")
			b.ReportMetric(mbps(best[0]), "stream-MB/s")
			b.ReportMetric(mbps(best[1]), "frames-MB/s")
			b.ReportMetric(mbps(best[1])/mbps(best[0]), "speed-ratio")
			b.ReportMetric(float64(size[0])/(1<<20), "stream-MiB")
			b.ReportMetric(float64(size[1])/(1<<20), "frames-MiB")
			b.ReportMetric(float64(size[1])/float64(size[0]), "size-ratio")
		})
	}
}

// failingSink fails (keeps an error, as a chunkSender does) from its
// failAt-th write on, and counts the writes it gets.
type failingSink struct {
	failAt, writes int
	err            error
}

func (s *failingSink) Write(p []byte) (int, error) {
	s.writes++
	if s.writes >= s.failAt {
		s.err = errors.New("sent nothing")
	}
	return len(p), nil
}

func (s *failingSink) Err() error { return s.err }

// TestFrameWriterStopsWhenSinkFails: once its destination fails, the
// writer writes nothing more and its Write fails within the frames
// already queued, so the dump feeding it stops.
func TestFrameWriterStopsWhenSinkFails(t *testing.T) {
	const workers, frames = 2, 16
	sink := &failingSink{failAt: 2}
	fw, err := newFrameWriter(sink, workers, NarEncoderOptions()...)
	if err != nil {
		t.Fatal(err)
	}
	piece := make([]byte, FrameSize)
	accepted := 0
	for ; accepted < frames; accepted++ {
		if _, err := fw.Write(piece); err != nil {
			if !errors.Is(err, errSinkFailed) {
				t.Fatalf("Write: %v, want errSinkFailed", err)
			}
			break
		}
	}
	fw.Close()
	// The failing frame, the frames queued behind it, the one being
	// handed to the writer and the one filling: at most workers+3 more.
	if accepted == frames || accepted > sink.failAt+workers+3 {
		t.Fatalf("%d of %d frames accepted after the sink failed at frame %d", accepted, frames, sink.failAt)
	}
	if sink.writes != sink.failAt {
		t.Fatalf("the sink got %d writes, want %d (none after it failed)", sink.writes, sink.failAt)
	}
}
