package coordinator

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/kilnci/kiln/cache"
	"github.com/kilnci/kiln/internal/benchnar"
	"github.com/kilnci/kiln/raftfsm"
)

// testNar is one store path as a Nix client would push it.
type testNar struct {
	path    string
	nar     []byte // uncompressed
	zst     []byte
	blob    string
	narinfo string
}

func storePathFor(name string) string {
	h := sha256.Sum256([]byte(name))
	return raftfsm.StoreDir + "/" + nixbase32.EncodeToString(h[:20]) + "-" + name
}

// fileNar is the NAR of one regular file holding content.
func fileNar(tb testing.TB, content []byte, executable bool) []byte {
	tb.Helper()
	b, err := benchnar.FileNAR(content, executable)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// makeNar builds a one-file NAR for name, compresses it and writes the
// narinfo; mutate may spoil it.
func makeNar(t *testing.T, name string, mutate func(narSize *int, narHash *[]byte)) testNar {
	t.Helper()
	narBytes := fileNar(t, []byte(strings.Repeat("contents of "+name+"\n", 50)), true)
	var zst bytes.Buffer
	enc, _ := zstd.NewWriter(&zst)
	enc.Write(narBytes)
	enc.Close()
	fh := sha256.Sum256(zst.Bytes())
	nh := sha256.Sum256(narBytes)
	narSize, narHash := len(narBytes), nh[:]
	if mutate != nil {
		mutate(&narSize, &narHash)
	}
	p := storePathFor(name)
	ni := fmt.Sprintf("StorePath: %s\nURL: nar/%s.nar.zst\nCompression: zstd\nFileHash: sha256:%s\nFileSize: %d\nNarHash: sha256:%s\nNarSize: %d\nReferences: \n",
		p, nixbase32.EncodeToString(fh[:]), nixbase32.EncodeToString(fh[:]), zst.Len(), nixbase32.EncodeToString(narHash), narSize)
	return testNar{path: p, nar: narBytes, zst: zst.Bytes(), blob: hex.EncodeToString(fh[:]), narinfo: ni}
}

func (n testNar) narURL(addr string) string {
	d, _ := hex.DecodeString(n.blob)
	return "http://" + addr + "/cache/nar/" + nixbase32.EncodeToString(d) + ".nar.zst"
}

func (n testNar) narinfoURL(addr string) string {
	return "http://" + addr + "/cache/" + raftfsm.HashPart(n.path) + ".narinfo"
}

func httpDo(t *testing.T, method, url, password string, body []byte) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if password != "" {
		req.SetBasicAuth("nix", password)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// push uploads like `nix copy`: the NAR, then the narinfo.
func push(t *testing.T, addr string, n testNar) (int, string) {
	t.Helper()
	if st, b := httpDo(t, http.MethodPut, n.narURL(addr), testToken, n.zst); st != http.StatusOK {
		return st, string(b)
	}
	st, b := httpDo(t, http.MethodPut, n.narinfoURL(addr), testToken, []byte(n.narinfo))
	return st, string(b)
}

func withCacheKey(t testing.TB) func(int, *Config) {
	dir := t.TempDir()
	key := filepath.Join(dir, "key.sec")
	if _, err := cache.WriteKeyFiles("test-1", key, filepath.Join(dir, "key.pub")); err != nil {
		t.Fatal(err)
	}
	return func(_ int, cfg *Config) {
		cfg.CacheKeyFile = key
		cfg.BlobSyncInterval = 500 * time.Millisecond
		cfg.BlobPushTimeout = 2 * time.Second
	}
}

// TestCacheReplication: a push through a follower is on a quorum when
// acknowledged and served by every node; a node that was down fetches what
// it missed; a corrupt blob is found and repaired by the scrub.
func TestCacheReplication(t *testing.T) {
	tc := startCluster(t, 3, withCacheKey(t))
	fi, f := tc.follower()
	first := makeNar(t, "first", nil)
	if st, msg := push(t, f.HTTPAddr(), first); st != http.StatusOK {
		t.Fatalf("push = %d %s", st, msg)
	}
	holders := 0
	for _, c := range tc.nodes {
		if c.blobs.Has(first.blob) {
			holders++
		}
	}
	if holders < 2 {
		t.Errorf("acknowledged upload held by %d nodes, want a quorum of 2", holders)
	}
	for i, c := range tc.nodes {
		tc.waitFor(5*time.Second, fmt.Sprintf("node %d serves the narinfo and NAR", i), func() bool {
			st, body := httpDo(t, http.MethodGet, first.narinfoURL(c.HTTPAddr()), "", nil)
			if st != http.StatusOK || !strings.Contains(string(body), "Sig: test-1:") {
				return false
			}
			st, nb := httpDo(t, http.MethodGet, first.narURL(c.HTTPAddr()), "", nil)
			return st == http.StatusOK && bytes.Equal(nb, first.zst)
		})
	}

	// Refused uploads change nothing anywhere.
	bad := makeNar(t, "bad-hash", func(_ *int, h *[]byte) { x := sha256.Sum256([]byte("x")); *h = x[:] })
	badSize := makeNar(t, "bad-size", func(s *int, _ *[]byte) { *s++ })
	tests := []struct {
		name     string
		password string
		n        testNar
		want     int
	}{
		{"wrong NarHash", testToken, bad, http.StatusBadRequest},
		{"wrong NarSize", testToken, badSize, http.StatusBadRequest},
		{"no credentials", "", makeNar(t, "anon", nil), http.StatusUnauthorized},
		{"wrong credentials", "not-the-token", makeNar(t, "wrong", nil), http.StatusForbidden},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			httpDo(t, http.MethodPut, tt.n.narURL(f.HTTPAddr()), tt.password, tt.n.zst)
			st, _ := httpDo(t, http.MethodPut, tt.n.narinfoURL(f.HTTPAddr()), tt.password, []byte(tt.n.narinfo))
			if st != tt.want {
				t.Errorf("narinfo PUT = %d, want %d", st, tt.want)
			}
			for i, c := range tc.nodes {
				if _, err := c.Read().NarInfo(raftfsm.HashPart(tt.n.path)); err == nil {
					t.Errorf("node %d recorded a refused upload", i)
				}
			}
		})
	}

	// A node that is down misses pushes, and fetches them once back.
	var downIdx int
	for i := range tc.nodes {
		if i != fi {
			downIdx = i
			break
		}
	}
	tc.stop(downIdx)
	var later []testNar
	for i := 0; i < 3; i++ {
		n := makeNar(t, fmt.Sprintf("later-%d", i), nil)
		tc.waitFor(10*time.Second, "push while a node is down", func() bool {
			st, _ := push(t, f.HTTPAddr(), n)
			return st == http.StatusOK
		})
		later = append(later, n)
	}
	back := tc.restart(downIdx)
	tc.waitFor(30*time.Second, "the restarted node serves what it missed", func() bool {
		for _, n := range later {
			st, nb := httpDo(t, http.MethodGet, n.narURL(back.HTTPAddr()), "", nil)
			if st != http.StatusOK || !bytes.Equal(nb, n.zst) {
				return false
			}
			if st, _ := httpDo(t, http.MethodGet, n.narinfoURL(back.HTTPAddr()), "", nil); st != http.StatusOK {
				return false
			}
		}
		return true
	})

	// Corrupt a blob on disk: the scrub finds it and repairs it from a peer.
	blobFile := filepath.Join(tc.cfgs[fi].DataDir, "blobs", first.blob[:2], first.blob)
	spoiled := bytes.Clone(first.zst)
	spoiled[len(spoiled)/2] ^= 0xff
	if err := os.WriteFile(blobFile, spoiled, 0o600); err != nil {
		t.Fatal(err)
	}
	rep, err := f.Scrub(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !contains(rep.Corrupt, first.blob) || !contains(rep.Repaired, first.blob) || len(rep.Unrepaired) != 0 {
		t.Errorf("scrub report = %+v, want %s corrupt and repaired", rep, first.blob)
	}
	got, err := os.ReadFile(blobFile)
	if err != nil || !bytes.Equal(got, first.zst) {
		t.Errorf("blob after repair differs (err %v)", err)
	}
}

// TestOrphanBlobsAreSwept: a NAR whose narinfo never comes is deleted
// after the grace period; one with a record stays.
func TestOrphanBlobsAreSwept(t *testing.T) {
	tc := startCluster(t, 1, withCacheKey(t), func(_ int, cfg *Config) { cfg.BlobOrphanGrace = time.Second })
	c := tc.nodes[0]
	kept := makeNar(t, "kept", nil)
	if st, msg := push(t, c.HTTPAddr(), kept); st != http.StatusOK {
		t.Fatalf("push = %d %s", st, msg)
	}
	orphan := makeNar(t, "orphan", nil)
	if st, _ := httpDo(t, http.MethodPut, orphan.narURL(c.HTTPAddr()), testToken, orphan.zst); st != http.StatusOK {
		t.Fatalf("NAR PUT = %d", st)
	}
	tc.waitFor(10*time.Second, "the orphan blob is swept", func() bool { return !c.blobs.Has(orphan.blob) })
	if !c.blobs.Has(kept.blob) {
		t.Errorf("the sweep removed a blob that a record names")
	}
}
