package e2e

import (
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"
)

// TestDevPrintsTokenAndServes: `kiln dev` starts a single-node cluster,
// prints its URLs and an admin token that authorises writes.
func TestDevPrintsTokenAndServes(t *testing.T) {
	dataDir := t.TempDir()
	httpAddr, raftAddr := freeAddr(t), freeAddr(t)
	p := startProc(t, "dev", "dev", "--data-dir", dataDir, "--http-addr", httpAddr, "--raft-addr", raftAddr)
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
