package cache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/kilnci/kiln/raftfsm"
)

// ErrBlobNotFound is returned for a blob the store does not hold.
var ErrBlobNotFound = fmt.Errorf("%w: blob", raftfsm.ErrNotFound)

// ErrBadBlobName refuses names that are not a lowercase hex SHA-256.
var ErrBadBlobName = fmt.Errorf("%w: blob name is not a sha256 hex digest", raftfsm.ErrInvalid)

// ErrHashMismatch refuses bytes that do not hash to the name they were put under.
var ErrHashMismatch = fmt.Errorf("%w: bytes do not match their hash", raftfsm.ErrInvalid)

// BlobStore holds content-addressed blobs named by the SHA-256 of their
// bytes. An S3-compatible backend can implement it too.
type BlobStore interface {
	// Put stores r under name, durably, verifying the bytes hash to name
	// and reading at most limit bytes.
	Put(ctx context.Context, name string, r io.Reader, limit int64) error
	// PutHashed stores r, durably, under the hex SHA-256 of its bytes,
	// reading at most limit bytes; it returns the name and the size.
	PutHashed(ctx context.Context, r io.Reader, limit int64) (string, int64, error)
	// PutCopy stores r, durably, under the name named returns once r has
	// been read to its end, reading at most limit bytes; it returns the
	// name and the size. It is for a copy of bytes another node hashed:
	// they are not hashed again (named checks the transfer, and Verify
	// finds a copy that does not match its name).
	PutCopy(ctx context.Context, r io.Reader, limit int64, named func() (string, error)) (string, int64, error)
	// Open returns the blob for reading, with its size.
	Open(name string) (io.ReadSeekCloser, int64, error)
	Has(name string) bool
	Delete(name string) error
	// Verify re-reads a blob and checks it still hashes to its name.
	Verify(ctx context.Context, name string) error
	// List calls fn for every blob with its last write time.
	List(ctx context.Context, fn func(name string, modified time.Time) error) error
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
	tmp := filepath.Join(root, "tmp")
	// Nothing writes yet: leftovers of a crash mid-Put go.
	if err := os.RemoveAll(tmp); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(tmp, 0o700); err != nil {
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
func (s *FSBlobStore) Put(ctx context.Context, name string, r io.Reader, limit int64) error {
	if _, err := s.path(name); err != nil {
		return err
	}
	_, _, err := s.put(ctx, name, r, limit, nil)
	return err
}

// PutHashed stores r under the hex SHA-256 of its bytes, atomically and
// durably, and returns that name and the size.
func (s *FSBlobStore) PutHashed(ctx context.Context, r io.Reader, limit int64) (string, int64, error) {
	return s.put(ctx, "", r, limit, nil)
}

// PutCopy stores r under the name named gives at its end, atomically and
// durably, without hashing it.
func (s *FSBlobStore) PutCopy(ctx context.Context, r io.Reader, limit int64, named func() (string, error)) (string, int64, error) {
	return s.put(ctx, "", r, limit, named)
}

// put stores r under want, under the name named returns when named is not
// nil, or else under its hash.
func (s *FSBlobStore) put(ctx context.Context, want string, r io.Reader, limit int64, named func() (string, error)) (name string, n int64, err error) {
	body := &ctxReader{ctx: ctx, r: io.LimitReader(r, limit+1)}
	if want != "" && s.Has(want) {
		// Take the bytes anyway (a sender expects them read), and refresh
		// the blob's age so a sweep of unreferenced blobs spares a blob
		// that is being uploaded again.
		if n, err = io.Copy(io.Discard, body); err != nil {
			return "", 0, err
		}
		return want, n, s.touch(want)
	}
	tmp, err := os.CreateTemp(filepath.Join(s.root, "tmp"), "put-*")
	if err != nil {
		return "", 0, err
	}
	defer func() {
		if tmp != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	var h hash.Hash
	if named == nil {
		h = sha256.New()
	}
	bw := newBlobWriter(tmp, h)
	defer bw.release()
	if n, err = bw.ReadFrom(body); err != nil {
		return "", 0, err
	}
	if err := bw.finish(); err != nil {
		return "", 0, err
	}
	if n > limit {
		return "", 0, fmt.Errorf("%w: blob over the %d-byte limit", raftfsm.ErrTooLarge, limit)
	}
	if named != nil {
		if name, err = named(); err != nil {
			return "", 0, err
		}
	} else {
		name = hex.EncodeToString(h.Sum(nil))
	}
	if want != "" && name != want {
		return "", 0, fmt.Errorf("%w: got %s, want %s", ErrHashMismatch, name, want)
	}
	if want == "" && s.Has(name) {
		return name, n, s.touch(name) // the deferred function drops the copy
	}
	final, err := s.path(name)
	if err != nil {
		return "", 0, err
	}
	if err := tmp.Sync(); err != nil {
		return "", 0, err
	}
	if err := tmp.Close(); err != nil {
		return "", 0, err
	}
	dir := filepath.Dir(final)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", 0, err
	}
	if err := os.Rename(tmp.Name(), final); err != nil {
		return "", 0, err
	}
	tmp = nil
	return name, n, syncDir(dir)
}

// touch refreshes a blob's age.
func (s *FSBlobStore) touch(name string) error {
	p, err := s.path(name)
	if err != nil {
		return err
	}
	now := time.Now()
	return os.Chtimes(p, now, now)
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

// Verify re-hashes a blob.
func (s *FSBlobStore) Verify(ctx context.Context, name string) error {
	f, _, err := s.Open(name)
	if err != nil {
		return err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, &ctxReader{ctx: ctx, r: f}); err != nil {
		return err
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != name {
		return fmt.Errorf("%w: %s now hashes to %s", ErrHashMismatch, name, got)
	}
	return nil
}

// List walks the fan-out directories; names that are not blobs are skipped.
func (s *FSBlobStore) List(ctx context.Context, fn func(name string, modified time.Time) error) error {
	dirs, err := os.ReadDir(s.root)
	if err != nil {
		return err
	}
	for _, d := range dirs {
		if !d.IsDir() || len(d.Name()) != 2 {
			continue
		}
		entries, err := os.ReadDir(filepath.Join(s.root, d.Name()))
		if err != nil {
			return err
		}
		for _, e := range entries {
			if err := ctx.Err(); err != nil {
				return err
			}
			if !ValidBlobName(e.Name()) || e.Name()[:2] != d.Name() {
				continue
			}
			info, err := e.Info()
			if err != nil {
				continue // deleted meanwhile
			}
			if err := fn(e.Name(), info.ModTime()); err != nil {
				return err
			}
		}
	}
	return nil
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
