package coordinator

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

const base32 = "0123456789abcdfghijklmnpqrsvwxyz"

// storePath makes a valid, deterministic store path for a name.
func storePath(name string) string {
	h := sha256.Sum256([]byte(name))
	b := make([]byte, 32)
	for i := range b {
		b[i] = base32[int(h[i])%32]
	}
	return "/nix/store/" + string(b) + "-" + name
}

// graphJSON is a small derivation graph: a shared input, then a build-specific top.
func graphJSON(i int) map[string]any {
	shared := storePath(fmt.Sprintf("shared-%d.drv", i%10))
	top := storePath(fmt.Sprintf("top-%d.drv", i))
	return map[string]any{
		"drv_path": top,
		"job":      fmt.Sprintf("job%d", i),
		"graph": []map[string]any{
			{"drv_path": shared, "system": "x86_64-linux", "outputs": map[string]string{"out": storePath(fmt.Sprintf("shared-%d", i%10))}},
			{"drv_path": top, "system": "x86_64-linux", "input_drvs": []string{shared}, "outputs": map[string]string{"out": storePath(fmt.Sprintf("top-%d", i))}},
		},
	}
}

func postJSON(ctx context.Context, client *http.Client, url, token string, body any) (int, map[string]any, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return 0, nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(b))
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return resp.StatusCode, nil, err
	}
	return resp.StatusCode, out, nil
}

// TestFailoverKeepsAcknowledgedBuilds: 1,000 builds through a follower; the
// leader stops; every acknowledged build is on the new leader, which takes
// writes within 5 s; the old leader restarted from its data dir catches up.
func TestFailoverKeepsAcknowledgedBuilds(t *testing.T) {
	tc := startCluster(t, 3)
	_, fol := tc.follower()
	client := &http.Client{Timeout: 10 * time.Second}
	url := "http://" + fol.HTTPAddr() + "/api/v1/builds"

	const n = 1000
	acked := make(map[uint64]string, n)
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := make(chan error, n)
	work := make(chan int)
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				status, out, err := postJSON(context.Background(), client, url, testToken, graphJSON(i))
				if err != nil || status != http.StatusCreated {
					errs <- fmt.Errorf("build %d: status %d, %v, %v", i, status, out, err)
					continue
				}
				mu.Lock()
				acked[uint64(out["id"].(float64))] = out["drv_path"].(string)
				mu.Unlock()
			}
		}()
	}
	for i := 0; i < n; i++ {
		work <- i
	}
	close(work)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if len(acked) != n {
		t.Fatalf("acknowledged %d distinct builds, want %d", len(acked), n)
	}

	li, old := tc.leader(5 * time.Second)
	oldApplied := old.AppliedIndex()
	stopped := time.Now()
	tc.stop(li)

	// The survivors elect a leader that accepts a write within 5 s.
	var writer *Coordinator
	for i, c := range tc.nodes {
		if i != li {
			writer = c
			break
		}
	}
	ctx, cancel := context.WithDeadline(context.Background(), stopped.Add(5*time.Second))
	defer cancel()
	var b *pb.Build
	var err error
	for {
		b, err = writer.SubmitBuild(ctx, submitMsg(n+1))
		if err == nil || ctx.Err() != nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("no write accepted within 5 s of stopping the leader: %v", err)
	}
	t.Logf("new leader accepted a write %v after the old one stopped", time.Since(stopped).Round(time.Millisecond))
	acked[b.Id] = b.DrvPath

	_, nl := tc.leader(5 * time.Second)
	checkBuilds(t, "new leader", nl.Read(), acked)

	// The old leader comes back from its data dir and catches up.
	re := tc.restart(li)
	target := nl.AppliedIndex()
	tc.waitFor(20*time.Second, "restarted node catches up", func() bool { return re.AppliedIndex() >= target })
	if re.AppliedIndex() < oldApplied {
		t.Fatalf("restarted node applied %d, less than before the stop (%d)", re.AppliedIndex(), oldApplied)
	}
	checkBuilds(t, "restarted node", re.Read(), acked)
	if diff := cmp.Diff(dumpOf(t, nl), dumpOf(t, re), protocmpOpt()); diff != "" {
		t.Fatalf("restarted node's state differs from the leader's (-leader +restarted):\n%s", diff)
	}
}

func submitMsg(i int) *pb.SubmitBuild {
	top := storePath(fmt.Sprintf("extra-%d.drv", i))
	return &pb.SubmitBuild{
		Build: &pb.Build{DrvPath: top},
		Graph: []*pb.DerivationNode{{DrvPath: top, System: "x86_64-linux", Outputs: []*pb.Output{{Name: "out", Path: storePath(fmt.Sprintf("extra-%d", i))}}}},
	}
}

func checkBuilds(t *testing.T, who string, r *raftfsm.Reader, want map[uint64]string) {
	t.Helper()
	missing := 0
	for id, drv := range want {
		b, err := r.Build(id)
		if err != nil || b.DrvPath != drv {
			missing++
			if missing < 5 {
				t.Errorf("%s: build %d: %v (drv %v, want %s)", who, id, err, b.GetDrvPath(), drv)
			}
		}
	}
	if missing > 0 {
		t.Fatalf("%s: %d of %d acknowledged builds missing", who, missing, len(want))
	}
}

func dumpOf(t *testing.T, c *Coordinator) *raftfsm.Dump {
	t.Helper()
	d, err := c.Read().Dump()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// TestBadInputChangesNothing: each bad request gets its status and leaves
// the state as it was.
func TestBadInputChangesNothing(t *testing.T) {
	tc := startCluster(t, 1)
	c := tc.nodes[0]
	client := &http.Client{Timeout: 10 * time.Second}
	base := "http://" + c.HTTPAddr()
	good := graphJSON(1)
	cyclic := graphJSON(2)
	cg := cyclic["graph"].([]map[string]any)
	cg[0]["input_drvs"] = []string{cyclic["drv_path"].(string)}

	cases := []struct {
		name   string
		path   string
		token  string
		body   string
		status int
	}{
		{"malformed JSON", "/api/v1/builds", testToken, `{"drv_path":`, http.StatusBadRequest},
		{"unknown field", "/api/v1/builds", testToken, `{"drv":"x"}`, http.StatusBadRequest},
		{"malformed store path", "/api/v1/builds", testToken, `{"drv_path":"/nix/store/abc.drv","graph":[]}`, http.StatusBadRequest},
		{"cycle", "/api/v1/builds", testToken, mustJSON(t, cyclic), http.StatusBadRequest},
		{"body over the limit", "/api/v1/builds", testToken, `{"drv_path":"` + string(bytes.Repeat([]byte("a"), 9<<20)) + `"}`, http.StatusRequestEntityTooLarge},
		{"no token", "/api/v1/builds", "", mustJSON(t, good), http.StatusUnauthorized},
		{"wrong token", "/api/v1/builds", "nope-nope-nope-nope", mustJSON(t, good), http.StatusForbidden},
		{"cancel unknown id", "/api/v1/builds/99999/cancel", testToken, `{}`, http.StatusNotFound},
		{"cancel bad id", "/api/v1/builds/abc/cancel", testToken, `{}`, http.StatusBadRequest},
	}
	before := dumpOf(t, c)
	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			req, _ := http.NewRequest(http.MethodPost, base+tt.path, bytes.NewReader([]byte(tt.body)))
			if tt.token != "" {
				req.Header.Set("Authorization", "Bearer "+tt.token)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var out map[string]any
			decErr := json.NewDecoder(resp.Body).Decode(&out)
			if resp.StatusCode != tt.status || decErr != nil || out["error"] == nil {
				t.Fatalf("status %d body %v (%v), want %d with an error message", resp.StatusCode, out, decErr, tt.status)
			}
		})
	}
	if diff := cmp.Diff(before, dumpOf(t, c), protocmpOpt()); diff != "" {
		t.Fatalf("bad input changed the state:\n%s", diff)
	}
	// GET of an unknown build is 404, of a bad id 400.
	for path, want := range map[string]int{"/api/v1/builds/424242": 404, "/api/v1/builds/x": 400, "/api/v1/nope": 404, "/api/v1/builds?state=bogus": 400} {
		resp, err := client.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s: %d, want %d", path, resp.StatusCode, want)
		}
	}
	_ = errors.New
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
