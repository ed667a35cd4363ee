//go:build !linux

package cache

import "errors"

// uring is Linux's io_uring; elsewhere blobs are written directly.
type uring struct{ pending int }

var errNoURing = errors.New("io_uring is not available")

func newURing(uint32) (*uring, error)                    { return nil, errNoURing }
func (*uring) write(int, []byte, int64, int) error       { return errNoURing }
func (*uring) reap(bool, func(tag int, res int32)) error { return errNoURing }
func (*uring) close()                                    {}
