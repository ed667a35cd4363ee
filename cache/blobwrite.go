package cache

import (
	"errors"
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
)

var blobBufs = sync.Pool{New: func() any { b := make([]byte, blobBlock+directAlign); return &b }}

// blobWriter writes one blob's temp file.
type blobWriter struct {
	f      *os.File
	raw    *[]byte // from blobBufs; nil once released
	buf    []byte  // the aligned block within raw
	n      int     // bytes in buf
	size   int64
	direct bool
	h      hash.Hash // when set, gets every byte
}

func newBlobWriter(f *os.File, h hash.Hash) *blobWriter {
	raw := blobBufs.Get().(*[]byte)
	off := 0
	if r := int(uintptr(unsafe.Pointer(&(*raw)[0])) % directAlign); r != 0 {
		off = directAlign - r
	}
	w := &blobWriter{f: f, raw: raw, buf: (*raw)[off : off+blobBlock], h: h}
	w.direct = setDirect(f, true) == nil
	return w
}

// ReadFrom reads r to its end into the file (read straight into the
// block, so a 1 MiB upload chunk is one read and, once the block is full,
// one write).
func (w *blobWriter) ReadFrom(r io.Reader) (int64, error) {
	var total int64
	for {
		k, err := r.Read(w.buf[w.n:])
		if k > 0 {
			if w.h != nil {
				w.h.Write(w.buf[w.n : w.n+k])
			}
			w.n += k
			total += int64(k)
			if w.n == len(w.buf) {
				if ferr := w.write(w.buf); ferr != nil {
					return total, ferr
				}
				w.n = 0
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

// write writes b, a whole number of aligned blocks when direct. Should
// the file system refuse the direct write after all, the file goes on
// through the page cache.
func (w *blobWriter) write(b []byte) error {
	k, err := w.f.Write(b)
	if err != nil && k == 0 && w.direct && errors.Is(err, syscall.EINVAL) && setDirect(w.f, false) == nil {
		w.direct = false
		k, err = w.f.Write(b)
	}
	w.size += int64(k)
	return err
}

// finish writes what is left in the block and leaves the file at its size
// (not yet synced).
func (w *blobWriter) finish() error {
	if w.n == 0 {
		return nil
	}
	tail := w.size + int64(w.n)
	if !w.direct {
		err := w.write(w.buf[:w.n])
		w.n = 0
		return err
	}
	padded := (w.n + directAlign - 1) / directAlign * directAlign
	clear(w.buf[w.n:padded])
	if err := w.write(w.buf[:padded]); err != nil {
		return err
	}
	w.n = 0
	return w.f.Truncate(tail)
}

// release gives the buffer back; the writer is not used after.
func (w *blobWriter) release() {
	if w.raw != nil {
		blobBufs.Put(w.raw)
		w.raw, w.buf = nil, nil
	}
}
