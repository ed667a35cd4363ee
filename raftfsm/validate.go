package raftfsm

import (
	"fmt"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// StoreDir is the Nix store the cluster builds for.
const StoreDir = "/nix/store"

// ValidStorePath reports whether p is a well-formed store path
// (/nix/store/<32 nix-base32 chars>-<name>), returning why not.
func ValidStorePath(p string) error {
	rest, ok := strings.CutPrefix(p, StoreDir+"/")
	if !ok {
		return fmt.Errorf("%w: store path %q is not under %s", ErrInvalid, trunc(p), StoreDir)
	}
	if len(rest) < 34 || rest[32] != '-' {
		return fmt.Errorf("%w: store path %q: want <32-char hash>-<name>", ErrInvalid, trunc(p))
	}
	for i := 0; i < 32; i++ {
		if !nixbase32.Is(rest[i]) {
			return fmt.Errorf("%w: store path %q: hash is not nix-base32", ErrInvalid, trunc(p))
		}
	}
	name := rest[33:]
	if len(name) > 211 {
		return fmt.Errorf("%w: store path name longer than 211 bytes", ErrInvalid)
	}
	if name[0] == '.' {
		return fmt.Errorf("%w: store path %q: name starts with a dot", ErrInvalid, trunc(p))
	}
	for _, c := range []byte(name) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("+-._?=", c) >= 0) {
			return fmt.Errorf("%w: store path %q: bad character %q in name", ErrInvalid, trunc(p), c)
		}
	}
	return nil
}

// ValidDrvPath is ValidStorePath for a derivation (.drv) path.
func ValidDrvPath(p string) error {
	if err := ValidStorePath(p); err != nil {
		return err
	}
	if !strings.HasSuffix(p, ".drv") {
		return fmt.Errorf("%w: %q is not a derivation (.drv) path", ErrInvalid, trunc(p))
	}
	return nil
}

// ValidName checks a project, jobset or job name the way Hydra does.
func ValidName(kind, s string) error {
	if s == "" || len(s) > 255 {
		return fmt.Errorf("%w: %s name must be 1 to 255 characters", ErrInvalid, kind)
	}
	for i, c := range []byte(s) {
		letter := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '_'
		if !(letter || i > 0 && (c >= '0' && c <= '9' || c == '-' || c == '.')) {
			return fmt.Errorf("%w: %s name %q: must match [A-Za-z_][A-Za-z0-9_.-]*", ErrInvalid, kind, trunc(s))
		}
	}
	return nil
}

func trunc(s string) string {
	if len(s) > 120 {
		return s[:120] + "…"
	}
	return s
}
