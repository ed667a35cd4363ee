package raftfsm

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// procStatusKiB reads a field (VmRSS, VmHWM) of /proc/self/status in KiB.
func procStatusKiB(field string) float64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return -1
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			v, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			return v
		}
	}
	return -1
}

// fanGraph is one build of 100 new steps: 99 leaves and a top needing them all.
func fanGraph(b int) *pb.SubmitBuild {
	top := node(fmt.Sprintf("top-%d", b))
	graph := []*pb.DerivationNode{top}
	for i := 0; i < 99; i++ {
		n := node(fmt.Sprintf("leaf-%d-%d", b, i))
		top.InputDrvs = append(top.InputDrvs, n.DrvPath)
		graph = append(graph, n)
	}
	return &pb.SubmitBuild{Build: &pb.Build{Id: uint64(b + 1), DrvPath: top.DrvPath, Project: "p", Jobset: "j", Job: fmt.Sprintf("job%d", b%500)}, Graph: graph}
}

// BenchmarkState1M builds a state of 1,000,000 queued steps (10,000 builds
// of 100 steps, submitted through ApplyBatch), then reports the memory it
// holds and the time to snapshot it to a file and restore it.
func BenchmarkState1M(b *testing.B) {
	const builds = 10000
	for b.Loop() {
		f := New(nil)
		var idx uint64
		var batch []*raft.Log
		for i := 0; i < builds; i += 10 {
			var cmds []*pb.Command
			for j := i; j < i+10; j++ {
				cmds = append(cmds, cmd(b, submitT, fanGraph(j), 1))
			}
			data, err := EncodeEntry(cmds)
			if err != nil {
				b.Fatal(err)
			}
			idx++
			batch = append(batch, &raft.Log{Type: raft.LogCommand, Index: idx, Data: data})
			if len(batch) == 16 || i+10 >= builds {
				for _, r := range f.ApplyBatch(batch) {
					if err := r.(*EntryResult).Results[0].Err; err != nil {
						b.Fatal(err)
					}
				}
				batch = batch[:0]
			}
		}
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		heap := float64(ms.HeapInuse) / (1 << 20)
		rss := procStatusKiB("VmRSS") / 1024
		b.Logf("heap: in use %d MiB, idle %d MiB (released %d MiB), next GC at %d MiB, live %d MiB; VmHWM %.0f MiB",
			ms.HeapInuse>>20, ms.HeapIdle>>20, ms.HeapReleased>>20, ms.NextGC>>20, ms.HeapAlloc>>20, procStatusKiB("VmHWM")/1024)
		if p := os.Getenv("KILN_HEAP_PROFILE"); p != "" {
			if out, err := os.Create(p); err == nil {
				_ = pprof.WriteHeapProfile(out)
				out.Close()
			}
		}
		n := 0
		each, _ := f.Read().StepsIn(nil, pb.StepState_STEP_STATE_RUNNABLE)
		each(func(StepRef) bool { n++; return true })
		each, _ = f.Read().StepsIn(nil, pb.StepState_STEP_STATE_WAITING)
		each(func(StepRef) bool { n++; return true })
		if n != builds*100 {
			b.Fatalf("%d queued steps, want %d", n, builds*100)
		}

		path := filepath.Join(b.TempDir(), "snap")
		start := time.Now()
		snap, err := f.Snapshot()
		if err != nil {
			b.Fatal(err)
		}
		out, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		sink := &fileSink{File: out}
		if err := snap.Persist(sink); err != nil {
			b.Fatal(err)
		}
		snapTime := time.Since(start)
		info, _ := os.Stat(path)

		start = time.Now()
		g := restoreFile(b, path)
		restoreTime := time.Since(start)
		// The restored copy alone: what a node that caught up from a
		// snapshot holds.
		f = nil
		runtime.GC()
		runtime.ReadMemStats(&ms)
		restoredHeap := float64(ms.HeapInuse) / (1 << 20)
		if got, _ := g.Read().Step(drv("leaf-9999-98")); got == nil {
			b.Fatal("restored state lacks a step")
		}
		// A node that caught up from this snapshot and holds nothing else:
		// the restore in a process of its own, its RSS after.
		cmd := exec.Command(os.Args[0], "-test.run=^TestRestoreChild$", "-test.v")
		cmd.Env = append(os.Environ(), "KILN_RESTORE_SNAPSHOT="+path)
		outb, err := cmd.CombinedOutput()
		if err != nil {
			b.Fatalf("restore in a child process: %v\n%s", err, outb)
		}
		var childRSS, childPeak float64
		i := bytes.Index(outb, []byte("restored: "))
		if i < 0 {
			b.Fatalf("child output lacks its figures:\n%s", outb)
		}
		if _, err := fmt.Sscanf(string(outb[i:]), "restored: rss %f MiB, peak %f MiB", &childRSS, &childPeak); err != nil {
			b.Fatalf("child output: %v\n%s", err, outb)
		}
		b.ReportMetric(heap, "heap-MiB")
		b.ReportMetric(rss, "rss-MiB")
		b.ReportMetric(restoredHeap, "restored-heap-MiB")
		b.ReportMetric(childRSS, "restored-node-rss-MiB")
		b.ReportMetric(childPeak, "restored-node-peak-MiB")
		b.ReportMetric(snapTime.Seconds(), "snapshot-s")
		b.ReportMetric(restoreTime.Seconds(), "restore-s")
		b.ReportMetric(float64(info.Size())/(1<<20), "snapshot-MiB")
		runtime.KeepAlive(g)
	}
}

// TestRestoreChild restores the snapshot KILN_RESTORE_SNAPSHOT names (run
// by BenchmarkState1M in a process of its own) and prints its RSS.
func TestRestoreChild(t *testing.T) {
	path := os.Getenv("KILN_RESTORE_SNAPSHOT")
	if path == "" {
		t.Skip("run by BenchmarkState1M")
	}
	g := restoreFile(t, path)
	runtime.GC()
	if got, _ := g.Read().Step(drv("leaf-9999-98")); got == nil {
		t.Fatal("restored state lacks a step")
	}
	fmt.Printf("restored: rss %.0f MiB, peak %.0f MiB\n", procStatusKiB("VmRSS")/1024, procStatusKiB("VmHWM")/1024)
	runtime.KeepAlive(g)
}

// restoreFile is a fresh FSM restored from the snapshot file at path.
func restoreFile(tb testing.TB, path string) *FSM {
	tb.Helper()
	in, err := os.Open(path)
	if err != nil {
		tb.Fatal(err)
	}
	g := New(nil)
	if err := g.Restore(in); err != nil {
		tb.Fatal(err)
	}
	return g
}

type fileSink struct{ *os.File }

func (s *fileSink) ID() string    { return "file" }
func (s *fileSink) Cancel() error { return s.File.Close() }
func (s *fileSink) Close() error {
	if err := s.File.Sync(); err != nil {
		return err
	}
	return s.File.Close()
}

// BenchmarkApplySubmit: small submissions (2 new steps each), 64 per entry.
func BenchmarkApplySubmit(b *testing.B) {
	f := New(nil)
	var idx, id uint64
	for b.Loop() {
		var cmds []*pb.Command
		for j := 0; j < 64; j++ {
			id++
			name := strconv.FormatUint(id, 10)
			cmds = append(cmds, cmd(b, submitT, submit(id, "t"+name, node("t"+name, "d"+name), node("d"+name)), 1))
		}
		data, _ := EncodeEntry(cmds)
		idx++
		f.Apply(&raft.Log{Type: raft.LogCommand, Index: idx, Data: data})
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(id), "us/submit")
}
