package cache_test

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/nix-community/go-nix/pkg/nixbase32"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/kilnci/kiln/cache"
	"github.com/kilnci/kiln/raftfsm"
)

func FuzzParseNarInfo(f *testing.F) {
	fx := buildNar(f, "fuzz")
	good := narInfoFor(fx, storePath("hello-2.12"), storeBase("hello-2.12"), storeBase("glibc-2.40"))
	f.Add(good.String())
	f.Add(good.String() + "System: x86_64-linux\nCA: fixed:r:sha256:" + strings.TrimPrefix(fx.narHash, "sha256:") + "\n")
	f.Add(good.String() + "Sig: kiln-test-1:" + strings.Repeat("A", 86) + "==\n")
	// Hashes in base16 and SRI form, which go-nix also parses.
	sum, _ := nixbase32.DecodeString(strings.TrimPrefix(fx.fileHash, "sha256:"))
	f.Add(strings.Replace(good.String(), fx.fileHash, "sha256:"+hex.EncodeToString(sum), 1))
	f.Add(strings.Replace(good.String(), "References: ", "References: "+storeBase("glibc-2.40")+" ", 1))
	f.Add(strings.Replace(good.String(), "Compression: zstd", "Compression: xz", 1))
	f.Add(strings.Replace(good.String(), "Deriver: ", "Deriver: unknown-deriver\nX: ", 1))
	f.Add(cache.SampleNarInfo)
	for _, junk := range []string{"", "\n", ":", "StorePath: ", "StorePath: /nix/store/../etc\n", "References:  \n",
		"FileSize: -1\n", "NarSize: 99999999999999999999999\n", "a: b: c\n", "\x00\r\n", strings.Repeat("References: x\n", 50)} {
		f.Add(junk)
	}

	f.Fuzz(func(t *testing.T, text string) {
		ni, err := cache.ParseNarInfo(strings.NewReader(text))
		if err != nil {
			if !errors.Is(err, raftfsm.ErrInvalid) && !errors.Is(err, raftfsm.ErrTooLarge) {
				t.Fatalf("ParseNarInfo error %v wraps neither ErrInvalid nor ErrTooLarge", err)
			}
			return
		}
		rec, err := cache.ToRecord(ni)
		if err != nil {
			if !errors.Is(err, raftfsm.ErrInvalid) {
				t.Fatalf("ToRecord error %v does not wrap ErrInvalid", err)
			}
			return
		}
		if err := raftfsm.ValidateNarInfo(rec); err != nil {
			t.Fatalf("ToRecord returned a record Apply refuses: %v", err)
		}
		again := cache.AppendNarInfo(nil, rec)
		if len(again) > cache.MaxNarInfoBytes {
			// Canonical hashes and signatures can be longer than the
			// forms they were given in; only possible at the size bound.
			return
		}
		ni2, err := cache.ParseNarInfo(bytes.NewReader(again))
		if err != nil {
			t.Fatalf("re-encoded narinfo does not parse: %v\n%s", err, again)
		}
		rec2, err := cache.ToRecord(ni2)
		if err != nil {
			t.Fatalf("re-encoded narinfo is not a valid record: %v\n%s", err, again)
		}
		if diff := cmp.Diff(rec, rec2, protocmp.Transform()); diff != "" {
			t.Fatalf("record changed in a text round trip (-first +second):\n%s", diff)
		}
	})
}

func FuzzParseRoute(f *testing.F) {
	fx := buildNar(f, "route")
	for _, p := range []string{
		"nix-cache-info",
		raftfsm.HashPart(storePath("hello-2.12")) + ".narinfo",
		fx.url(),
		"log/" + storeBase("hello-2.12.drv"),
		"log/" + storeBase("a..drv"),
		"../etc/passwd", "nar/../../etc/passwd", "nar/../blob.nar.zst", "/etc/passwd",
		`nar/\..\x.nar.zst`, "abc\x00.narinfo", strings.Repeat("eout", 8) + ".narinfo",
		strings.Repeat("a", 600) + ".narinfo", "nar/" + fx.fileB32 + ".nar.xz",
		"nar/" + fx.blob + ".nar.zst", "log/../../x.drv", "log//etc/passwd",
		"log/" + storeBase("x.drv") + "/../y.drv", "log/.." + strings.Repeat("a", 30) + "-x.drv",
		"nar/" + strings.ToUpper(fx.fileB32) + ".nar.zst", "nar/" + strings.Repeat("z", 52) + ".nar.zst",
	} {
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, p string) {
		rt, err := cache.ParseRoute(p)
		if err != nil {
			if !errors.Is(err, raftfsm.ErrInvalid) && !errors.Is(err, raftfsm.ErrNotFound) {
				t.Fatalf("ParseRoute(%q) error %v wraps neither ErrInvalid nor ErrNotFound", p, err)
			}
			if rt != (cache.Route{}) {
				t.Fatalf("ParseRoute(%q) failed with a route %+v", p, rt)
			}
			return
		}
		// Whatever routes is a plain name: no path segment climbs, and
		// nothing a file system would interpret is in it.
		for _, seg := range strings.Split(p, "/") {
			if seg == "" || seg == "." || seg == ".." {
				t.Fatalf("ParseRoute(%q) = %+v for a path with segment %q", p, rt, seg)
			}
		}
		if strings.ContainsAny(p, "\\\x00") {
			t.Fatalf("ParseRoute(%q) = %+v for a path with a backslash or NUL", p, rt)
		}
		switch rt.Kind {
		case cache.RouteCacheInfo:
			if p != "nix-cache-info" || rt.Key != "" {
				t.Fatalf("ParseRoute(%q) = %+v", p, rt)
			}
		case cache.RouteNarInfo:
			if len(rt.Key) != 32 || nixbase32.ValidateString(rt.Key) != nil || p != rt.Key+".narinfo" {
				t.Fatalf("ParseRoute(%q) = %+v: want a 32-character nix-base32 hash part", p, rt)
			}
		case cache.RouteNar:
			if !cache.ValidBlobName(rt.Key) {
				t.Fatalf("ParseRoute(%q) = %+v: key is not a blob name", p, rt)
			}
			// The route is the canonical name of exactly that digest.
			d, _ := hex.DecodeString(rt.Key)
			if want := "nar/" + nixbase32.EncodeToString(d) + ".nar.zst"; p != want {
				t.Fatalf("ParseRoute(%q) = %+v, whose canonical path is %q", p, rt, want)
			}
		case cache.RouteLog:
			if err := raftfsm.ValidDrvPath(rt.Key); err != nil {
				t.Fatalf("ParseRoute(%q) = %+v: %v", p, rt, err)
			}
			base, ok := strings.CutPrefix(rt.Key, raftfsm.StoreDir+"/")
			if !ok || strings.Contains(base, "/") || strings.Contains(rt.Key, "/..") || p != "log/"+base {
				t.Fatalf("ParseRoute(%q) = %+v: key is not %s/<derivation basename>", p, rt, raftfsm.StoreDir)
			}
		default:
			t.Fatalf("ParseRoute(%q) = %+v: unknown kind", p, rt)
		}
	})
}
