package cache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"testing/iotest"
)

// TestBlobWriter: blobs of sizes around the alignment and the block come
// out whole, at their size, directly (through an io_uring where the kernel
// has one) or through the page cache, whatever pieces they are read in;
// the hash sees every byte once.
func TestBlobWriter(t *testing.T) {
	ring, err := newURing(blobQueue)
	if err == nil {
		ring.close()
	} else {
		t.Logf("direct writes without io_uring: %v", err)
	}
	rng := rand.New(rand.NewPCG(7, 8))
	for _, size := range []int{0, 1, directAlign - 1, directAlign, directAlign + 1, blobBlock - 1, blobBlock, blobBlock + 1, 3*blobBlock + 12345, 2*blobQueue*blobBlock + 123} {
		data := make([]byte, size)
		for i := range data {
			data[i] = byte(rng.Uint32())
		}
		for _, direct := range []bool{true, false} {
			for _, halves := range []bool{false, true} {
				f, err := os.CreateTemp(t.TempDir(), "blob")
				if err != nil {
					t.Fatal(err)
				}
				h := sha256.New()
				w := newBlobWriter(f, h)
				if !direct && w.direct {
					if err := setDirect(f, false); err != nil {
						t.Fatal(err)
					}
					w.direct = false
				}
				var r io.Reader = bytes.NewReader(data)
				if halves {
					r = iotest.HalfReader(r)
				}
				n, err := w.ReadFrom(r)
				if err == nil {
					err = w.finish()
				}
				// Past its first block a direct blob is queued, where it can be.
				if queued := w.ring != nil; ring != nil && w.direct && size > 2*blobBlock && !queued {
					t.Errorf("size %d: written directly without the io_uring", size)
				}
				w.release()
				if err != nil || n != int64(size) {
					t.Fatalf("size %d direct %v (was %v): %d bytes, %v", size, direct, w.direct, n, err)
				}
				f.Close()
				got, err := os.ReadFile(f.Name())
				if err != nil {
					t.Fatal(err)
				}
				sum := sha256.Sum256(data)
				if !bytes.Equal(got, data) || !bytes.Equal(h.Sum(nil), sum[:]) {
					t.Fatalf("size %d direct %v: the file (%d bytes) or the hash differ from what was written", size, direct, len(got))
				}
			}
		}
	}
	// Whether this file system took O_DIRECT (the tests pass either way).
	f, err := os.CreateTemp(t.TempDir(), "blob")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	t.Logf("O_DIRECT in %s: %v", os.TempDir(), setDirect(f, true) == nil)
}

// TestBlobWriterQueuedFailure: a queued write that fails (here, to a file
// open only for reading) fails the blob with the system's error, and the
// writer gives its buffers back.
func TestBlobWriterQueuedFailure(t *testing.T) {
	ring, err := newURing(blobQueue)
	if err != nil {
		t.Skipf("no io_uring: %v", err)
	}
	path := filepath.Join(t.TempDir(), "blob")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := newBlobWriter(f, nil)
	w.ring, w.tried = ring, true // as after a first block written directly
	_, err = w.ReadFrom(bytes.NewReader(make([]byte, 3*blobBlock)))
	if err == nil {
		err = w.finish()
	}
	w.release()
	if !errors.Is(err, syscall.EBADF) {
		t.Fatalf("a blob whose queued writes fail: %v, want EBADF", err)
	}
	if w.raws != nil || w.ring != nil {
		t.Fatal("release kept the buffers or the ring")
	}
}

// TestPutCopy: a copy over the limit is refused whole, and a copy stores
// under the name given at its end.
func TestPutCopy(t *testing.T) {
	s, err := NewFSBlobStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("kiln"), blobBlock/2+3)
	sum := sha256.Sum256(data)
	name := hex.EncodeToString(sum[:])
	if _, _, err := s.PutCopy(context.Background(), bytes.NewReader(data), int64(len(data))-1, func() (string, error) { return name, nil }); err == nil || s.Has(name) {
		t.Fatalf("a copy over the limit: %v, stored %v", err, s.Has(name))
	}
	got, n, err := s.PutCopy(context.Background(), bytes.NewReader(data), int64(len(data)), func() (string, error) { return name, nil })
	if err != nil || got != name || n != int64(len(data)) {
		t.Fatalf("PutCopy = %s, %d, %v", got, n, err)
	}
	if err := s.Verify(context.Background(), name); err != nil {
		t.Fatalf("the stored copy: %v", err)
	}
}
