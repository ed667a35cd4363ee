// Package benchnar runs the NAR-ingest benchmarks: their NAR, their zstd CLI baseline, their rounds.
package benchnar

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/kilnci/kiln/agent"
	kilnv1 "github.com/kilnci/kiln/rpc/gen/kiln/v1"
	"github.com/kilnci/kiln/rpc/gen/kiln/v1/kilnv1connect"
)

// NAR is a NAR of one file of size bytes (a multiple of 4 KiB), in 4 KiB
// runs alternately random and repetitive: it compresses like a typical
// output. The same size gives the same bytes.
func NAR(size int) ([]byte, error) {
	if size <= 0 || size%4096 != 0 {
		return nil, fmt.Errorf("benchnar: size %d is not a positive multiple of 4096", size)
	}
	data := make([]byte, size)
	rng := rand.New(rand.NewPCG(1, 2))
	run := bytes.Repeat([]byte("kiln nar ingest "), 256)
	for i := 0; i < size; i += 4096 {
		if (i/4096)%2 == 0 {
			for j := i; j < i+4096; j += 8 {
				v := rng.Uint64()
				for k := 0; k < 8; k++ {
					data[j+k] = byte(v >> (8 * k))
				}
			}
		} else {
			copy(data[i:i+4096], run)
		}
	}
	return FileNAR(data, false)
}

// FileNAR is the NAR of one regular file holding content.
func FileNAR(content []byte, executable bool) ([]byte, error) {
	var b bytes.Buffer
	nw, err := nar.NewWriter(&b)
	if err != nil {
		return nil, err
	}
	if err := nw.WriteHeader(&nar.Header{Path: "/", Type: nar.TypeRegular, Size: int64(len(content)), Executable: executable}); err != nil {
		return nil, err
	}
	if _, err := nw.Write(content); err != nil {
		return nil, err
	}
	if err := nw.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// ZstdCLI is how long `zstd -3 -T2` takes to compress file to nowhere:
// the baseline the ingest benchmarks report their ratio against.
func ZstdCLI(file string) (time.Duration, error) {
	t0 := time.Now()
	cmd := exec.Command("zstd", "-3", "-T2", "-q", "-c", file)
	cmd.Stdout = io.Discard
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("zstd -3 -T2 %s: %w", file, err)
	}
	return time.Since(t0), nil
}

// Ingest is a NAR-ingest benchmark: an agent (this process, running
// agent.StreamNar as `kiln agent` does) uploads a 64 MiB NAR to a cluster.
type Ingest struct {
	Client     kilnv1connect.AgentServiceClient
	Credential string // a registered agent's
	// Lease submits a one-step build whose output is out and leases its
	// step as the agent; it is not timed.
	Lease func(round int) (leaseID uint64, out string)
	// Processes are the cluster's processes other than this one (none
	// when it runs in this one): the CPU figure adds their time to this
	// process's.
	Processes []int
	// Profile, if set, starts profiling the rounds; what it returns stops.
	Profile func() (stop func())
}

// Run times three rounds, each the zstd CLI on the NAR and then an
// ingest (compress + upload + verify + store + replicate to a quorum +
// commit) of a NAR new to the cluster, and reports the best of each:
// kiln-MB/s and zstd-MB/s of NAR, their ratio, and kiln-cpu-ms (the
// least CPU time an ingest took).
func (in Ingest) Run(b *testing.B) {
	if _, err := exec.LookPath("zstd"); err != nil {
		b.Fatal("zstd not found: make bench installs it")
	}
	narBytes, err := NAR(64 << 20)
	if err != nil {
		b.Fatal(err)
	}
	narFile := filepath.Join(b.TempDir(), "bench.nar")
	if err := os.WriteFile(narFile, narBytes, 0o600); err != nil {
		b.Fatal(err)
	}
	mbps := func(d time.Duration) float64 { return float64(len(narBytes)) / (1 << 20) / d.Seconds() }
	stop := func() {}
	if in.Profile != nil {
		stop = in.Profile()
	}
	var zstdBest, kilnBest, kilnCPU time.Duration
	for round := 0; round < 3; round++ {
		d, err := ZstdCLI(narFile)
		if err != nil {
			b.Fatal(err)
		}
		if zstdBest == 0 || d < zstdBest {
			zstdBest = d
		}
		leaseID, out := in.Lease(round)
		narBytes[len(narBytes)-100] = byte(round) // a new NAR each round: every upload is a full ingest
		// Nix hashed the NAR when it registered the output; an agent reads
		// that from its store (nix-store --dump-db) and does not hash again.
		nh := sha256.Sum256(narBytes)
		cpu0 := in.cpu(b)
		t0 := time.Now()
		hdr := &kilnv1.NarHeader{LeaseId: leaseID, StorePath: out}
		if _, err := agent.StreamNar(context.Background(), in.Client, in.Credential, hdr, "sha256:"+nixbase32.EncodeToString(nh[:]), uint64(len(narBytes)),
			func(w io.Writer) error { _, err := w.Write(narBytes); return err }); err != nil {
			b.Fatal(err)
		}
		if d := time.Since(t0); kilnBest == 0 || d < kilnBest {
			kilnBest = d
		}
		if cpu := in.cpu(b) - cpu0; kilnCPU == 0 || cpu < kilnCPU {
			kilnCPU = cpu
		}
	}
	stop()
	b.ReportMetric(mbps(kilnBest), "kiln-MB/s")
	b.ReportMetric(float64(kilnCPU.Microseconds())/1000, "kiln-cpu-ms")
	b.ReportMetric(mbps(zstdBest), "zstd-MB/s")
	b.ReportMetric(mbps(kilnBest)/mbps(zstdBest), "ratio")
}

// cpu is the CPU time (user and system, all threads) used so far by this
// process and in.Processes.
func (in Ingest) cpu(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	total := time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	for _, pid := range in.Processes {
		t, err := procCPU(pid)
		if err != nil {
			b.Fatal(err)
		}
		total += t
	}
	return total
}

// procCPU is the CPU time process pid has used, from /proc/pid/stat in
// clock ticks (USER_HZ, 100 on Linux).
func procCPU(pid int) (time.Duration, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, in parentheses, may hold spaces: fields count
	// from after its closing one (utime and stime are fields 14 and 15).
	s := string(raw)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fields) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, s)
	}
	var ticks int64
	for _, f := range fields[11:13] {
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * (time.Second / 100), nil
}
