package cache

import (
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// A blob's temp file is written in blocks of blobBlock bytes from a buffer
// aligned to directAlign, with O_DIRECT where the file system takes it:
// the bytes go to the disk without being copied into the page cache. On
// the benchmark machine (a VM), copying 32 MiB into page-cache memory the
// guest had not touched before cost about 80 ms of CPU against about 3 ms
// direct (docs/design.md, "Measured"), and a blob written this way does
// not push out of memory what the binary cache serves. The last block is
// padded to the alignment, and the file then truncated to its size.
const (
	blobBlock   = 1 << 20
	directAlign = 4096
	// blobQueue is how many blocks a writer has in flight at once
	// through its io_uring (each blobBlock of memory).
	blobQueue = 4
)

var blobBufs = sync.Pool{New: func() any { b := make([]byte, blobBlock+directAlign); return &b }}

// blobWriter writes one blob's temp file. Where the kernel has io_uring,
// direct writes after the first block go through one (see uring): up to
// blobQueue blocks are written while the next is filled, and the
// goroutine waits in no write system call.
type blobWriter struct {
	f      *os.File
	raws   []*[]byte // from blobBufs; given back by release
	blocks [][]byte  // the aligned blocks within raws
	busy   [blobQueue]bool
	cur    int // the block being filled
	n      int // bytes in it
	size   int64
	direct bool
	h      hash.Hash // when set, gets every byte
	ring   *uring    // once the first block is written directly
	tried  bool      // a ring was asked for
	err    error     // a queued write's failure
}

func newBlobWriter(f *os.File, h hash.Hash) *blobWriter {
	w := &blobWriter{f: f, h: h}
	w.addBlock()
	w.direct = setDirect(f, true) == nil
	return w
}

// addBlock takes one more buffer from the pool, as block len(blocks).
func (w *blobWriter) addBlock() {
	raw := blobBufs.Get().(*[]byte)
	off := 0
	if r := int(uintptr(unsafe.Pointer(&(*raw)[0])) % directAlign); r != 0 {
		off = directAlign - r
	}
	w.raws = append(w.raws, raw)
	w.blocks = append(w.blocks, (*raw)[off:off+blobBlock])
}

// ReadFrom reads r to its end into the file (read straight into the
// block, so a 1 MiB upload chunk is one read and, once the block is full,
// one write).
func (w *blobWriter) ReadFrom(r io.Reader) (int64, error) {
	var total int64
	for {
		buf := w.blocks[w.cur]
		k, err := r.Read(buf[w.n:])
		if k > 0 {
			if w.h != nil {
				w.h.Write(buf[w.n : w.n+k])
			}
			w.n += k
			total += int64(k)
			if w.n == len(buf) {
				if ferr := w.flush(); ferr != nil {
					return total, ferr
				}
			}
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// flush writes the full block being filled and moves on to a free one.
func (w *blobWriter) flush() error {
	if w.err != nil {
		return w.err
	}
	if w.ring == nil && w.direct && w.size > 0 && !w.tried {
		// The first block went directly: the file system takes aligned
		// direct writes, and this blob is big enough to queue its blocks.
		w.tried = true
		w.ring, _ = newURing(blobQueue)
	}
	if w.ring == nil {
		w.n = 0
		return w.write(w.blocks[w.cur])
	}
	// Every write still pending is a whole block, after what is written.
	at := w.size + int64(w.ring.pending)*blobBlock
	if err := w.ring.write(int(w.f.Fd()), w.blocks[w.cur], at, w.cur); err != nil {
		return err
	}
	w.busy[w.cur] = true
	w.n = 0
	for {
		for i := range w.blocks {
			if !w.busy[i] {
				w.cur = i
				return nil
			}
		}
		if len(w.blocks) < blobQueue {
			w.addBlock()
			continue
		}
		if err := w.reap(true); err != nil {
			return err
		}
	}
}

// reap takes the queued writes that are done (with wait, at least one).
func (w *blobWriter) reap(wait bool) error {
	err := w.ring.reap(wait, func(tag int, res int32) {
		w.busy[tag] = false
		switch {
		case res < 0:
			w.fail(fmt.Errorf("writing a blob: %w", syscall.Errno(-res)))
		case res != blobBlock:
			w.fail(fmt.Errorf("writing a blob: %w (%d of %d bytes)", io.ErrShortWrite, res, blobBlock))
		default:
			w.size += blobBlock
		}
	})
	if err != nil {
		w.fail(err)
	}
	return w.err
}

func (w *blobWriter) fail(err error) {
	if w.err == nil {
		w.err = err
	}
}

// drain waits until no write is queued.
func (w *blobWriter) drain() error {
	for w.ring != nil && w.ring.pending > 0 {
		if err := w.reap(true); err != nil {
			return err
		}
	}
	return w.err
}

// write writes b at the end of what is written (after every queued write
// is done), a whole number of aligned blocks when direct. Should
// the file system refuse the direct write after all, the file goes on
// through the page cache.
func (w *blobWriter) write(b []byte) error {
	k, err := w.f.WriteAt(b, w.size)
	if err != nil && k == 0 && w.direct && errors.Is(err, syscall.EINVAL) && setDirect(w.f, false) == nil {
		w.direct = false
		k, err = w.f.WriteAt(b, w.size)
	}
	w.size += int64(k)
	return err
}

// finish writes what is left in the block and leaves the file at its size
// (not yet synced).
func (w *blobWriter) finish() error {
	if err := w.drain(); err != nil {
		return err
	}
	if w.n == 0 {
		return nil
	}
	buf := w.blocks[w.cur]
	tail := w.size + int64(w.n)
	if !w.direct {
		err := w.write(buf[:w.n])
		w.n = 0
		return err
	}
	padded := (w.n + directAlign - 1) / directAlign * directAlign
	clear(buf[w.n:padded])
	if err := w.write(buf[:padded]); err != nil {
		return err
	}
	w.n = 0
	return w.f.Truncate(tail)
}

// release waits for any write still queued and gives the buffers back;
// the writer is not used after.
func (w *blobWriter) release() {
	if w.ring != nil {
		w.ring.close()
		w.ring = nil
	}
	for _, raw := range w.raws {
		blobBufs.Put(raw)
	}
	w.raws, w.blocks = nil, nil
}
