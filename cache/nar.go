package cache

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/nar"

	"github.com/kilnci/kiln/raftfsm"
)

// NarSummary is what reading a whole NAR found.
type NarSummary struct {
	Hash [32]byte // SHA-256 of the uncompressed NAR
	Size uint64
}

// countingHash hashes and counts what passes through, failing past max.
type countingHash struct {
	r   io.Reader
	h   interface{ Write([]byte) (int, error) }
	n   uint64
	max uint64
	// inNar: the end of the input is io.ErrUnexpectedEOF, because the
	// NAR parser takes an io.EOF at a token boundary for the end of the
	// archive and would accept a truncated NAR.
	inNar bool
	// stop, once set, fails every read (to unwind an abandoned parser).
	stop error
}

func (c *countingHash) Read(p []byte) (int, error) {
	if c.stop != nil {
		return 0, c.stop
	}
	n, err := c.r.Read(p)
	c.h.Write(p[:n])
	c.n += uint64(n)
	if c.n > c.max {
		return n, fmt.Errorf("%w: NAR over %d bytes", raftfsm.ErrTooLarge, c.max)
	}
	if n == 0 && err == io.EOF && c.inNar {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

// ReadNarZst decompresses a zstd NAR, checks it is one well-formed NAR and
// nothing more, and returns its hash and size. maxNar bounds the
// uncompressed size.
func ReadNarZst(r io.Reader, maxNar uint64) (NarSummary, error) {
	dec, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxWindow(64<<20))
	if err != nil {
		return NarSummary{}, err
	}
	defer dec.Close()
	return ReadNar(dec, maxNar)
}

// ReadNar is ReadNarZst for an uncompressed NAR.
func ReadNar(r io.Reader, maxNar uint64) (NarSummary, error) {
	h := sha256.New()
	ch := &countingHash{r: r, h: h, max: maxNar, inNar: true}
	nr, err := nar.NewReader(ch)
	if err != nil {
		return NarSummary{}, badNar(err)
	}
	for {
		_, err := nr.Next()
		if errors.Is(err, io.EOF) {
			break // the parser's own end of archive: input ends are ErrUnexpectedEOF
		}
		if err != nil {
			return NarSummary{}, badNar(err)
		}
		if _, err := io.Copy(io.Discard, nr); err != nil {
			// The parser's goroutine waits in Next for us to finish the
			// file: resume it with every read failing so that it ends
			// instead of blocking forever.
			ch.stop = err
			_, _ = nr.Next()
			return NarSummary{}, badNar(err)
		}
	}
	ch.inNar = false
	// Anything after the NAR is refused.
	var one [1]byte
	if n, err := io.ReadFull(ch, one[:]); n > 0 {
		return NarSummary{}, fmt.Errorf("%w: bytes after the end of the NAR", raftfsm.ErrInvalid)
	} else if err != nil && !errors.Is(err, io.EOF) {
		return NarSummary{}, badNar(err)
	}
	var s NarSummary
	copy(s.Hash[:], h.Sum(nil))
	s.Size = ch.n
	return s, nil
}

func badNar(err error) error {
	if errors.Is(err, raftfsm.ErrTooLarge) || errors.Is(err, raftfsm.ErrInvalid) {
		return err
	}
	return fmt.Errorf("%w: not a valid zstd NAR: %v", raftfsm.ErrInvalid, err)
}

// zstdEncoder options shared by log compression.
func newZstdWriter(w io.Writer) (*zstd.Encoder, error) {
	return zstd.NewWriter(w, zstd.WithEncoderConcurrency(1), zstd.WithEncoderLevel(zstd.SpeedDefault))
}
