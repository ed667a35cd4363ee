package cache

import (
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/kilnci/kiln/raftfsm"
)

// RouteKind is what a path under /cache/ names.
type RouteKind int

const (
	RouteCacheInfo RouteKind = iota + 1 // nix-cache-info
	RouteNarInfo                        // <hash>.narinfo
	RouteNar                            // nar/<filehash>.nar.zst
	RouteLog                            // log/<drv basename>
)

// Route is a parsed cache path.
type Route struct {
	Kind RouteKind
	// Hash part for RouteNarInfo, blob name (hex) for RouteNar, the
	// derivation's store path for RouteLog.
	Key string
}

// ErrNoRoute is a path that names nothing in the cache.
var ErrNoRoute = fmt.Errorf("%w: no such cache path", raftfsm.ErrNotFound)

// ParseRoute maps a path relative to the cache root (no leading slash,
// already percent-decoded) to what it names. Only exact patterns match:
// a malformed hash or name is ErrInvalid, anything else ErrNoRoute. No
// route ever yields a file name: blobs are opened by their hex digest.
func ParseRoute(p string) (Route, error) {
	if len(p) > 512 {
		return Route{}, fmt.Errorf("%w: path over 512 bytes", raftfsm.ErrInvalid)
	}
	switch {
	case p == "nix-cache-info":
		return Route{Kind: RouteCacheInfo}, nil
	case strings.HasSuffix(p, ".narinfo") && !strings.Contains(p, "/"):
		h := strings.TrimSuffix(p, ".narinfo")
		if !validHashPart(h) {
			return Route{}, fmt.Errorf("%w: %.80q is not a 32-character nix-base32 hash", raftfsm.ErrInvalid, h)
		}
		return Route{Kind: RouteNarInfo, Key: h}, nil
	case strings.HasPrefix(p, "nar/"):
		name, ok := strings.CutSuffix(p[len("nar/"):], ".nar.zst")
		if !ok {
			return Route{}, fmt.Errorf("%w: NARs are nar/<52-character nix-base32 hash>.nar.zst", ErrNoRoute)
		}
		if len(name) != 52 || nixbase32.ValidateString(name) != nil {
			return Route{}, fmt.Errorf("%w: %.80q is not a 52-character nix-base32 sha256", raftfsm.ErrInvalid, name)
		}
		d, err := nixbase32.DecodeString(name)
		if err != nil || len(d) != 32 || nixbase32.EncodeToString(d) != name {
			return Route{}, fmt.Errorf("%w: %.80q is not a nix-base32 sha256", raftfsm.ErrInvalid, name)
		}
		return Route{Kind: RouteNar, Key: hex.EncodeToString(d)}, nil
	case strings.HasPrefix(p, "log/"):
		drv := raftfsm.StoreDir + "/" + p[len("log/"):]
		if strings.Contains(p[len("log/"):], "/") {
			return Route{}, fmt.Errorf("%w: log names are derivation basenames", raftfsm.ErrInvalid)
		}
		if err := raftfsm.ValidDrvPath(drv); err != nil {
			return Route{}, err
		}
		return Route{Kind: RouteLog, Key: drv}, nil
	}
	return Route{}, ErrNoRoute
}
