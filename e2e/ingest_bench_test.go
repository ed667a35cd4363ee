package e2e

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/nixbase32"

	"connectrpc.com/connect"

	"github.com/kilnci/kiln/agent"
	"github.com/kilnci/kiln/internal/benchnar"
	"github.com/kilnci/kiln/rpc"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

// BenchmarkNarIngestProcesses is coordinator's BenchmarkNarIngest against
// three real `kiln coordinator` processes, as a farm runs them: NAR ingest
// (zstd compress + upload + verify + store + replicate to a quorum +
// commit) in MB/s of NAR, next to `zstd -3 -T2` on the same NAR in the
// same run. The agent's side (agent.StreamNar, what `kiln agent` runs) is
// this process; it uploads to the leader. The CPU figure adds this
// process's and the three coordinators'.
func BenchmarkNarIngestProcesses(b *testing.B) {
	if _, err := exec.LookPath("zstd"); err != nil {
		b.Fatal("zstd not found: make bench installs it")
	}
	narBytes, err := benchnar.NAR(64 << 20)
	if err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	narFile := filepath.Join(dir, "bench.nar")
	if err := os.WriteFile(narFile, narBytes, 0o600); err != nil {
		b.Fatal(err)
	}
	mbps := func(d time.Duration) float64 { return float64(len(narBytes)) / (1 << 20) / d.Seconds() }

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
	reg := connect.NewRequest(&kilnv1.RegisterRequest{Name: "bench", Systems: []string{"x86_64-linux"}, MaxJobs: 1})
	reg.Header().Set("Authorization", "Bearer "+agentToken)
	regResp, err := client.Register(context.Background(), reg)
	if err != nil {
		b.Fatal(err)
	}
	cred := regResp.Msg.Credential

	cpu := func() time.Duration {
		var ru syscall.Rusage
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
			b.Fatal(err)
		}
		total := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		for _, n := range nodes {
			total += procCPU(b, n.cmd.Process.Pid)
		}
		return total
	}
	var zstdBest, kilnBest, kilnCPU time.Duration
	for round := 0; round < 3; round++ {
		d, err := benchnar.ZstdCLI(narFile)
		if err != nil {
			b.Fatal(err)
		}
		if zstdBest == 0 || d < zstdBest {
			zstdBest = d
		}
		// A one-step build whose output this NAR is; the agent leases it.
		drv, out := storePath(fmt.Sprintf("ingest-%d.drv", round)), storePath(fmt.Sprint("ingest-", round))
		build := map[string]any{"drv_path": drv, "project": "bench", "jobset": "ingest", "job": fmt.Sprint("round", round),
			"graph": []map[string]any{{"drv_path": drv, "system": "x86_64-linux", "outputs": map[string]string{"out": out}}}}
		if code, err := postJSON("http://"+leader.http+"/api/v1/builds", token, build, nil); err != nil || code/100 != 2 {
			b.Fatalf("submitting round %d: %d %v", round, code, err)
		}
		lr := connect.NewRequest(&kilnv1.LeaseRequest{FreeSlots: 1, WaitSeconds: 5})
		lr.Header().Set("Authorization", "Bearer "+cred)
		resp, err := client.Lease(context.Background(), lr)
		if err != nil || len(resp.Msg.Leases) != 1 {
			b.Fatalf("lease: %v", err)
		}
		narBytes[len(narBytes)-100] = byte(round) // a new NAR each round: every upload is a full ingest
		nh := sha256.Sum256(narBytes)             // the agent reads this from its store
		cpu0 := cpu()
		t0 := time.Now()
		hdr := &kilnv1.NarHeader{LeaseId: resp.Msg.Leases[0].LeaseId, StorePath: out}
		if _, err := agent.StreamNar(context.Background(), client, cred, hdr, "sha256:"+nixbase32.EncodeToString(nh[:]), uint64(len(narBytes)),
			func(w io.Writer) error { _, err := w.Write(narBytes); return err }); err != nil {
			b.Fatal(err)
		}
		if d := time.Since(t0); kilnBest == 0 || d < kilnBest {
			kilnBest = d
		}
		if c := cpu() - cpu0; kilnCPU == 0 || c < kilnCPU {
			kilnCPU = c
		}
	}
	b.ReportMetric(mbps(kilnBest), "kiln-MB/s")
	b.ReportMetric(float64(kilnCPU.Microseconds())/1000, "kiln-cpu-ms")
	b.ReportMetric(mbps(zstdBest), "zstd-MB/s")
	b.ReportMetric(mbps(kilnBest)/mbps(zstdBest), "ratio")
}

// procCPU is the CPU time (user and system, all threads) process pid has
// used, from /proc/pid/stat in clock ticks (USER_HZ, 100 on Linux).
func procCPU(b *testing.B, pid int) time.Duration {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// The command name, in parentheses, may hold spaces: fields count
	// from after its closing one (utime and stime are fields 14 and 15).
	s := string(raw)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fields) < 13 {
		b.Fatalf("/proc/%d/stat: %q", pid, s)
	}
	var ticks int64
	for _, f := range fields[11:13] {
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			b.Fatalf("/proc/%d/stat: %v", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * (time.Second / 100)
}
