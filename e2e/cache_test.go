package e2e

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// nixEnv runs the real Nix client: chroot stores under dir, no
// cache.nixos.org, a fresh narinfo disk cache for every call (Nix would
// otherwise remember the unsigned narinfo it uploaded, and misses).
type nixEnv struct {
	t   *testing.T
	dir string
	n   int
}

func newNixEnv(t *testing.T) *nixEnv {
	t.Helper()
	for _, bin := range []string{"nix", "nix-build", "nix-store"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s not found: run `make deps` (apt-get install -y nix-bin busybox-static)", bin)
		}
	}
	if _, err := os.Stat("/bin/busybox"); err != nil {
		t.Fatalf("/bin/busybox not found: run `make deps` (apt-get install -y busybox-static)")
	}
	return &nixEnv{t: t, dir: t.TempDir()}
}

// run runs a Nix command and returns its stdout; failure is an error with stderr.
func (e *nixEnv) run(name string, args ...string) (string, error) {
	e.n++
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+filepath.Join(e.dir, fmt.Sprintf("xdg-%d", e.n)), "NIX_CONFIG=experimental-features = nix-command")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, errb.String())
	}
	return out.String(), nil
}

func (e *nixEnv) must(name string, args ...string) string {
	e.t.Helper()
	out, err := e.run(name, args...)
	if err != nil {
		e.t.Fatal(err)
	}
	return out
}

func (e *nixEnv) store(name string) string { return filepath.Join(e.dir, name) }

// build builds attrs of expr in the chroot store s and returns the output paths.
func (e *nixEnv) build(s, expr string, attrs ...string) []string {
	e.t.Helper()
	file := filepath.Join(e.dir, fmt.Sprintf("expr-%d.nix", e.n))
	if err := os.WriteFile(file, []byte(expr), 0o644); err != nil {
		e.t.Fatal(err)
	}
	args := []string{"--store", e.store(s), "--option", "substituters", "", "--option", "sandbox-paths", "/bin/sh=/bin/busybox", "--no-out-link", file}
	for _, a := range attrs {
		args = append(args, "-A", a)
	}
	return strings.Fields(e.must("nix-build", args...))
}

// dump is `nix store dump-path` of a path in a chroot store: the NAR, so
// two stores hold the same path exactly when their dumps are equal.
func (e *nixEnv) dump(s, path string) []byte {
	e.t.Helper()
	return []byte(e.must("nix", "store", "dump-path", "--store", e.store(s), path))
}

const cacheExpr = `
let nonce = "NONCE"; in rec {
  lib = derivation {
    name = "kiln-e2e-lib";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    inherit nonce;
    args = [ "-c" "echo building the lib $nonce; mkdir -p $out/share/deep/nested/dir && echo $nonce > $out/share/deep/nested/dir/file && printf '#!/bin/sh\\necho hi\\n' > $out/run && chmod +x $out/run && ln -s share/deep $out/link && ln -s /nonexistent $out/dangling" ];
  };
  multi = derivation {
    name = "kiln-e2e-multi";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    outputs = [ "out" "dev" ];
    inherit lib nonce;
    args = [ "-c" "echo building multi; mkdir -p $out $dev && echo $lib > $out/uses-lib && echo $out > $dev/points-to-out" ];
  };
  later = derivation {
    name = "kiln-e2e-later";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    inherit lib nonce;
    args = [ "-c" "mkdir -p $out && echo $lib $nonce > $out/later" ];
  };
}`

// TestNixCopyAndSubstitute: paths pushed with `nix copy` to a follower are
// substituted from another node with signatures required; verification
// passes with the cluster key and fails with another; a follower that was
// down serves what was pushed meanwhile within 30 s; a blob corrupted on
// disk is found and repaired by the scrub.
func TestNixCopyAndSubstitute(t *testing.T) {
	nx := newNixEnv(t)
	keyDir := t.TempDir()
	secret, public := filepath.Join(keyDir, "cache.sec"), filepath.Join(keyDir, "cache.pub")
	if out, err := exec.Command(kilnBin, "keygen", "e2e-cache-1", "--secret-file", secret, "--public-file", public).CombinedOutput(); err != nil {
		t.Fatalf("keygen: %v\n%s", err, out)
	}
	pubKey, err := os.ReadFile(public)
	if err != nil {
		t.Fatal(err)
	}
	key := strings.TrimSpace(string(pubKey))
	nodes := startCoordinators(t, 3, func(int) []string {
		return []string{"--cache-key-file", secret, "--blob-sync-interval", "1s", "--cache-scrub-interval", "2s"}
	})
	li := leaderOf(nodes)
	if li < 0 {
		t.Fatal("no leader")
	}
	// Push to a follower, substitute from the leader (which applied every
	// acknowledged push); the other follower is checked after it restarts.
	fi, oi := (li+1)%3, li
	netrc := filepath.Join(nx.dir, "netrc")
	if err := os.WriteFile(netrc, []byte("machine 127.0.0.1\nlogin nix\npassword "+token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	expr := strings.ReplaceAll(cacheExpr, "NONCE", fmt.Sprint(time.Now().UnixNano()))
	outs := nx.build("src", expr, "multi.out", "multi.dev")
	if len(outs) != 2 {
		t.Fatalf("built %v, want two outputs", outs)
	}
	closure := strings.Fields(nx.must("nix-store", "--store", nx.store("src"), "-qR", outs[0], outs[1]))
	if len(closure) != 3 {
		t.Fatalf("closure %v, want lib, out and dev", closure)
	}
	cacheURL := func(n *coordProc) string { return "http://" + n.http + "/cache" }
	pushTo := func(n *coordProc, paths ...string) error {
		args := append([]string{"copy", "--store", nx.store("src"), "--option", "substituters", "", "--option", "netrc-file", netrc,
			"--to", cacheURL(n) + "?compression=zstd"}, paths...)
		_, err := nx.run("nix", args...)
		return err
	}
	// Without credentials nothing is stored.
	if _, err := nx.run("nix", "copy", "--store", nx.store("src"), "--option", "substituters", "", "--to", cacheURL(nodes[fi])+"?compression=zstd", outs[0]); err == nil {
		t.Fatal("nix copy without credentials succeeded")
	}
	if code := httpStatus(t, cacheURL(nodes[fi])+"/"+hashPart(closure[0])+".narinfo"); code != http.StatusNotFound {
		t.Fatalf("unauthenticated push left a narinfo (status %d)", code)
	}
	if err := pushTo(nodes[fi], outs...); err != nil {
		t.Fatal(err)
	}
	substitute := func(n *coordProc, store string, paths ...string) error {
		args := append([]string{"--store", nx.store(store), "--option", "substituters", cacheURL(n),
			"--option", "trusted-public-keys", key, "--option", "require-sigs", "true", "-r"}, paths...)
		_, err := nx.run("nix-store", args...)
		return err
	}
	if err := substitute(nodes[oi], "dst", outs...); err != nil {
		t.Fatal(err)
	}
	for _, p := range closure {
		if !bytes.Equal(nx.dump("src", p), nx.dump("dst", p)) {
			t.Errorf("%s differs between the source store and the substituted one", p)
		}
	}
	// Signature checks against the cache itself.
	verify := func(n *coordProc, k string) error {
		args := append([]string{"store", "verify", "--option", "substituters", "", "--store", cacheURL(n), "--trusted-public-keys", k}, closure...)
		_, err := nx.run("nix", args...)
		return err
	}
	if err := verify(nodes[oi], key); err != nil {
		t.Errorf("nix store verify with the cluster key: %v", err)
	}
	otherKey := strings.Replace(key, "e2e-cache-1:", "other-key:", 1)
	if err := verify(nodes[oi], otherKey); err == nil {
		t.Errorf("nix store verify passed with a key that did not sign")
	}
	// nix log through the cache, after copying the build log there.
	drv := strings.TrimSpace(nx.must("nix-store", "--store", nx.store("src"), "-qd", closure[0]))
	nx.must("nix", "store", "copy-log", "--store", nx.store("src"), "--option", "substituters", "", "--option", "netrc-file", netrc, "--to", cacheURL(nodes[fi]), drv)
	waitFor(t, 10*time.Second, "nix log through another node", func() bool {
		out, err := nx.run("nix", "log", "--option", "substituters", "", "--store", cacheURL(nodes[oi]), libPath(closure))
		return err == nil && strings.Contains(out, "building the lib")
	})

	// A follower goes down; paths pushed meanwhile reach it once it is back.
	down := 3 - fi - li // the other follower
	nodes[down].kill()
	later := nx.build("src", expr, "later")
	waitFor(t, 20*time.Second, "a push while a node is down", func() bool { return pushTo(nodes[fi], later...) == nil })
	nodes[down].start()
	waitFor(t, 30*time.Second, "the restarted node serves the new path", func() bool {
		return substitute(nodes[down], fmt.Sprintf("after-restart-%d", nx.n), later...) == nil
	})

	// Corrupt the new path's blob on one node: the scrub repairs it.
	blob := blobOf(t, nodes[down], later[0])
	file := filepath.Join(nodes[down].dataDir, "blobs", blob[:2], blob)
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	spoiled := bytes.Clone(data)
	spoiled[len(spoiled)/2] ^= 0x55
	if err := os.WriteFile(file, spoiled, 0o600); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the scrub logs the corrupt blob and repairs it", func() bool {
		b, err := os.ReadFile(file)
		logged, _ := os.ReadFile(nodes[down].log.Name())
		return err == nil && bytes.Equal(b, data) && bytes.Contains(logged, []byte("scrub: corrupt blob removed")) && bytes.Contains(logged, []byte(blob))
	})
	if err := substitute(nodes[down], "after-repair", later...); err != nil {
		t.Errorf("substituting after the repair: %v", err)
	}
}

func hashPart(p string) string { return strings.TrimPrefix(p, "/nix/store/")[:32] }

func libPath(closure []string) string {
	for _, p := range closure {
		if strings.HasSuffix(p, "-kiln-e2e-lib") {
			return p
		}
	}
	return ""
}

func httpStatus(t *testing.T, url string) int {
	t.Helper()
	resp, err := client.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// blobOf reads a path's narinfo from a node and returns its blob name.
func blobOf(t *testing.T, n *coordProc, path string) string {
	t.Helper()
	resp, err := client.Get("http://" + n.http + "/cache/" + hashPart(path) + ".narinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	for _, line := range strings.Split(string(body), "\n") {
		if h, ok := strings.CutPrefix(line, "FileHash: sha256:"); ok {
			d, err := nixbase32.DecodeString(h)
			if err != nil {
				t.Fatal(err)
			}
			return hex.EncodeToString(d)
		}
	}
	t.Fatalf("no FileHash in narinfo of %s: %s", path, body)
	return ""
}
