//go:build !linux

package cache

import (
	"errors"
	"os"
)

// setDirect: blobs are written through the page cache here.
func setDirect(*os.File, bool) error { return errors.ErrUnsupported }
