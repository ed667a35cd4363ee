package e2e

import (
	"crypto/sha256"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"
)

const token = "e2e-admin-token-0123456789abcdef"

const base32 = "0123456789abcdfghijklmnpqrsvwxyz"

func storePath(name string) string {
	h := sha256.Sum256([]byte(name))
	b := make([]byte, 32)
	for i := range b {
		b[i] = base32[int(h[i])%32]
	}
	return "/nix/store/" + string(b) + "-" + name
}

func buildRequest(i int) map[string]any {
	shared := storePath(fmt.Sprintf("lib-%d.drv", i%7))
	top := storePath(fmt.Sprintf("app-%d.drv", i))
	return map[string]any{
		"drv_path": top,
		"project":  "e2e", "jobset": "main", "job": fmt.Sprintf("app%d", i),
		"graph": []map[string]any{
			{"drv_path": shared, "system": "x86_64-linux", "outputs": map[string]string{"out": storePath(fmt.Sprintf("lib-%d", i%7))}},
			{"drv_path": top, "system": "x86_64-linux", "input_drvs": []string{shared}, "outputs": map[string]string{"out": storePath(fmt.Sprintf("app-%d", i)), "doc": storePath(fmt.Sprintf("app-%d-doc", i))}},
		},
	}
}

// TestThreeCoordinatorsSurviveKill9: three real `kiln coordinator`
// processes; builds submitted through a follower; the leader is killed with
// SIGKILL and restarted from its data dir; every acknowledged build is on
// every node and /api/v1/cluster shows three voters.
func TestThreeCoordinatorsSurviveKill9(t *testing.T) {
	nodes := startCoordinators(t, 3, nil)
	threeVoters := func(n *coordProc) bool { return countVoters(n) == 3 }
	leaderIdx := func() int { return leaderOf(nodes) }
	li := leaderIdx()
	if li < 0 {
		t.Fatal("no leader")
	}
	fi := (li + 1) % 3

	// Submit through a follower, concurrently.
	const n = 300
	acked := map[uint64]string{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	work := make(chan int)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				var out struct {
					ID      uint64 `json:"id"`
					DrvPath string `json:"drv_path"`
				}
				code, err := postJSON("http://"+nodes[fi].http+"/api/v1/builds", token, buildRequest(i), &out)
				if err != nil || code != http.StatusCreated {
					t.Errorf("submit %d: %d %v", i, code, err)
					continue
				}
				mu.Lock()
				acked[out.ID] = out.DrvPath
				mu.Unlock()
			}
		}()
	}
	for i := 0; i < n; i++ {
		work <- i
	}
	close(work)
	wg.Wait()
	if len(acked) != n {
		t.Fatalf("%d builds acknowledged, want %d", len(acked), n)
	}

	// kill -9 the leader.
	nodes[li].kill()
	waitFor(t, 15*time.Second, "a new leader", func() bool { l := leaderIdx(); return l >= 0 && l != li })
	// The survivors keep taking writes.
	var out struct {
		ID      uint64 `json:"id"`
		DrvPath string `json:"drv_path"`
	}
	waitFor(t, 15*time.Second, "a write accepted after the kill", func() bool {
		code, err := postJSON("http://"+nodes[fi].http+"/api/v1/builds", token, buildRequest(n), &out)
		return err == nil && code == http.StatusCreated
	})
	acked[out.ID] = out.DrvPath

	// Restart the killed leader from its data dir.
	nodes[li].start()
	waitFor(t, 30*time.Second, "the restarted node is ready and sees three voters", func() bool {
		code, _ := getJSON("http://"+nodes[li].http+"/ready", nil)
		return code == 200 && threeVoters(nodes[li])
	})
	for _, node := range nodes {
		waitFor(t, 30*time.Second, "every acknowledged build on "+node.name, func() bool {
			for id, drv := range acked {
				var b struct {
					DrvPath string `json:"drv_path"`
				}
				if code, err := getJSON(fmt.Sprintf("http://%s/api/v1/builds/%d", node.http, id), &b); err != nil || code != 200 || b.DrvPath != drv {
					return false
				}
			}
			return true
		})
	}
	var list struct {
		Meta struct {
			Total int `json:"total"`
		} `json:"meta"`
	}
	if code, err := getJSON("http://"+nodes[li].http+"/api/v1/builds?per_page=1", &list); err != nil || code != 200 || list.Meta.Total != len(acked) {
		t.Fatalf("restarted node lists %d builds (status %d, %v), want %d", list.Meta.Total, code, err, len(acked))
	}
}
