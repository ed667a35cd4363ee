package e2e

import (
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestDevPrintsTokenAndServes: `kiln dev` starts a single-node cluster,
// prints its URLs and an admin token that authorises writes.
func TestDevPrintsTokenAndServes(t *testing.T) {
	dataDir := t.TempDir()
	httpAddr, raftAddr := freeAddr(t), freeAddr(t)
	p := startProc(t, "dev", "dev", "--data-dir", dataDir, "--http-addr", httpAddr, "--raft-addr", raftAddr, "--no-agent")
	defer func() {
		if t.Failed() {
			p.dumpLog()
		}
	}()
	tokenRE := regexp.MustCompile(`Admin token: ([0-9a-f]{48})`)
	var token string
	waitFor(t, 20*time.Second, "kiln dev prints its admin token", func() bool {
		b, _ := os.ReadFile(p.log.Name())
		if m := tokenRE.FindSubmatch(b); m != nil {
			token = string(m[1])
			return true
		}
		return false
	})
	kept, err := os.ReadFile(filepath.Join(dataDir, "admin-token"))
	if err != nil || string(kept) != token+"\n" {
		t.Fatalf("token file holds %q (%v), printed %q", kept, err, token)
	}
	if info, err := os.Stat(filepath.Join(dataDir, "admin-token")); err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("token file mode: %v %v, want 0600", info.Mode(), err)
	}
	waitFor(t, 20*time.Second, "ready", func() bool {
		code, _ := getJSON("http://"+httpAddr+"/ready", nil)
		return code == http.StatusOK
	})
	var out struct {
		ID uint64 `json:"id"`
	}
	code, err := postJSON("http://"+httpAddr+"/api/v1/builds", token, buildRequest(1), &out)
	if err != nil || code != http.StatusCreated || out.ID == 0 {
		t.Fatalf("submit with the printed token: %d %v %+v", code, err, out)
	}
	code, _ = postJSON("http://"+httpAddr+"/api/v1/builds", "wrong-token-wrong-token", buildRequest(2), nil)
	if code != http.StatusForbidden {
		t.Fatalf("submit with a wrong token: %d, want 403", code)
	}
}

// TestDevBuildsExamples: `kiln dev` runs a local agent; `kiln build`
// builds examples/default.nix on it end to end (what `make demo` does).
func TestDevBuildsExamples(t *testing.T) {
	nx := newNixEnv(t)
	dataDir := t.TempDir()
	httpAddr, raftAddr := freeAddr(t), freeAddr(t)
	p := startProc(t, "dev", "dev", "--data-dir", dataDir, "--http-addr", httpAddr, "--raft-addr", raftAddr,
		"--agent-store", filepath.Join(dataDir, "agent-store"), "--agent-nix-option", "sandbox-paths=/bin/sh=/bin/busybox")
	defer func() {
		if t.Failed() {
			p.dumpLog()
		}
	}()
	waitFor(t, 20*time.Second, "ready with a local agent", func() bool {
		code, _ := getJSON("http://"+httpAddr+"/ready", nil)
		return code == http.StatusOK && p.logged("agent registered")
	})
	cmd := exec.Command(kilnBin, "build", "-f", "../examples/default.nix", "-A", "all", "--coordinator", "http://"+httpAddr,
		"--token-file", filepath.Join(dataDir, "admin-token"), "--store", nx.store("src"), "--timeout", "2m")
	cmd.Env = append(os.Environ(), "XDG_CACHE_HOME="+filepath.Join(nx.dir, "xdg-dev"))
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("kiln build: %v\n%s", err, errb.String())
	}
	paths := strings.Fields(out.String())
	if len(paths) != 1 || !strings.HasSuffix(paths[0], "-examples") {
		t.Fatalf("kiln build printed %q, want the examples output", out.String())
	}
	parts, err := os.ReadFile(filepath.Join(dataDir, "agent-store", paths[0], "parts"))
	if err != nil || strings.Count(string(parts), "/nix/store/") != 2 {
		t.Errorf("the built output lists %q (%v), want its two inputs", parts, err)
	}
}
