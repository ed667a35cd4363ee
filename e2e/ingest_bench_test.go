package e2e

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"connectrpc.com/connect"

	"github.com/kilnci/kiln/internal/benchnar"
	"github.com/kilnci/kiln/rpc"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

// BenchmarkNarIngestProcesses is coordinator's BenchmarkNarIngest against
// three real `kiln coordinator` processes, as a farm runs them: NAR ingest
// in MB/s of NAR, next to `zstd -3 -T2` on the same NAR in the same run
// (benchnar.Ingest). The agent's side is this process; it uploads to the
// leader. The CPU figure adds this process's and the three coordinators'.
func BenchmarkNarIngestProcesses(b *testing.B) {
	dir := b.TempDir()
	secret, public := filepath.Join(dir, "cache.sec"), filepath.Join(dir, "cache.pub")
	if out, err := exec.Command(kilnBin, "keygen", "bench-1", "--secret-file", secret, "--public-file", public).CombinedOutput(); err != nil {
		b.Fatalf("keygen: %v\n%s", err, out)
	}
	tokenFile := filepath.Join(dir, "agent-token")
	if err := os.WriteFile(tokenFile, []byte(agentToken+"\n"), 0o600); err != nil {
		b.Fatal(err)
	}
	nodes := startCoordinators(b, 3, func(int) []string {
		return []string{"--cache-key-file", secret, "--agent-token-file", tokenFile, "--lease-ttl", "10m"}
	})
	li := leaderOf(nodes)
	if li < 0 {
		b.Fatal("no leader")
	}
	leader := nodes[li]
	client := kilnv1connect.NewAgentServiceClient(rpc.NewHTTPClient(16), "http://"+leader.http)
	authed := func(r interface{ Header() http.Header }, tok string) { r.Header().Set("Authorization", "Bearer "+tok) }
	reg := connect.NewRequest(&kilnv1.RegisterRequest{Name: "bench", Systems: []string{"x86_64-linux"}, MaxJobs: 1})
	authed(reg, agentToken)
	regResp, err := client.Register(context.Background(), reg)
	if err != nil {
		b.Fatal(err)
	}
	cred := regResp.Msg.Credential
	var pids []int
	for _, n := range nodes {
		pids = append(pids, n.cmd.Process.Pid)
	}
	benchnar.Ingest{
		Client: client, Credential: cred,
		Processes: pids,
		Lease: func(round int) (uint64, string) {
			drv, out := storePath(fmt.Sprintf("ingest-%d.drv", round)), storePath(fmt.Sprint("ingest-", round))
			build := map[string]any{"drv_path": drv, "project": "bench", "jobset": "ingest", "job": fmt.Sprint("round", round),
				"graph": []map[string]any{{"drv_path": drv, "system": "x86_64-linux", "outputs": map[string]string{"out": out}}}}
			if code, err := postJSON("http://"+leader.http+"/api/v1/builds", token, build, nil); err != nil || code/100 != 2 {
				b.Fatalf("submitting round %d: %d %v", round, code, err)
			}
			lr := connect.NewRequest(&kilnv1.LeaseRequest{FreeSlots: 1, WaitSeconds: 5})
			authed(lr, cred)
			resp, err := client.Lease(context.Background(), lr)
			if err != nil || len(resp.Msg.Leases) != 1 {
				b.Fatalf("lease: %v", err)
			}
			return resp.Msg.Leases[0].LeaseId, out
		},
	}.Run(b)
}
