package cache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// ErrBlobNotFound is returned for a blob the store does not hold.
var ErrBlobNotFound = errors.New("blob not found")

// ErrBadBlobName refuses names that are not a lowercase hex SHA-256.
var ErrBadBlobName = errors.New("blob name is not a sha256 hex digest")

// ErrHashMismatch refuses bytes that do not hash to the name they were put under.
var ErrHashMismatch = errors.New("blob bytes do not match their hash")

// BlobStore holds content-addressed blobs named by the SHA-256 of their
// bytes. An S3-compatible backend can implement it too.
type BlobStore interface {
	// Put stores r under name, durably, verifying the bytes hash to name
	// and reading at most limit bytes.
	Put(ctx context.Context, name string, r io.Reader, limit int64) error
	// Open returns the blob for reading, with its size.
	Open(name string) (io.ReadSeekCloser, int64, error)
	Has(name string) bool
	Delete(name string) error
}

// FSBlobStore keeps blobs as files under a root directory, fanned out by
// the first two hex digits. Writes go to a temp file, are fsynced, renamed,
// and the directory is fsynced.
type FSBlobStore struct {
	root string
}

var _ BlobStore = (*FSBlobStore)(nil)

// NewFSBlobStore opens (creating) a blob store under root.
func NewFSBlobStore(root string) (*FSBlobStore, error) {
	if err := os.MkdirAll(filepath.Join(root, "tmp"), 0o700); err != nil {
		return nil, err
	}
	return &FSBlobStore{root: root}, nil
}

// ValidBlobName reports whether name is a lowercase hex SHA-256 digest.
func ValidBlobName(name string) bool {
	if len(name) != 64 {
		return false
	}
	for _, c := range []byte(name) {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

func (s *FSBlobStore) path(name string) (string, error) {
	if !ValidBlobName(name) {
		return "", fmt.Errorf("%w: %.80q", ErrBadBlobName, name)
	}
	return filepath.Join(s.root, name[:2], name), nil
}

// Put writes the blob atomically and durably.
func (s *FSBlobStore) Put(ctx context.Context, name string, r io.Reader, limit int64) (err error) {
	final, err := s.path(name)
	if err != nil {
		return err
	}
	if s.Has(name) {
		return nil
	}
	tmp, err := os.CreateTemp(filepath.Join(s.root, "tmp"), "put-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(tmp, h), &ctxReader{ctx: ctx, r: io.LimitReader(r, limit+1)})
	if err != nil {
		return err
	}
	if n > limit {
		return fmt.Errorf("blob over the %d-byte limit", limit)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != name {
		return fmt.Errorf("%w: got %s, want %s", ErrHashMismatch, got, name)
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	dir := filepath.Dir(final)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Open opens a blob.
func (s *FSBlobStore) Open(name string) (io.ReadSeekCloser, int64, error) {
	p, err := s.path(name)
	if err != nil {
		return nil, 0, err
	}
	f, err := os.Open(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, 0, fmt.Errorf("%w: %s", ErrBlobNotFound, name)
	}
	if err != nil {
		return nil, 0, err
	}
	info, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	return f, info.Size(), nil
}

// Has reports whether the blob is present.
func (s *FSBlobStore) Has(name string) bool {
	p, err := s.path(name)
	if err != nil {
		return false
	}
	_, err = os.Stat(p)
	return err == nil
}

// Delete removes a blob; a missing one is ErrBlobNotFound.
func (s *FSBlobStore) Delete(name string) error {
	p, err := s.path(name)
	if err != nil {
		return err
	}
	if err := os.Remove(p); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%w: %s", ErrBlobNotFound, name)
	} else if err != nil {
		return err
	}
	return syncDir(filepath.Dir(p))
}

// ctxReader stops a copy when its context ends.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c *ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
