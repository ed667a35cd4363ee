package raftfsm

import (
	"fmt"
	"testing"

	"github.com/google/go-cmp/cmp"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

func featNode(name, system string, features ...string) *pb.DerivationNode {
	n := node(name)
	n.System = system
	n.RequiredFeatures = features
	return n
}

func TestPickRunnable(t *testing.T) {
	a := newApplier(t)
	submitOne := func(id uint64, prio int32, global int64, n *pb.DerivationNode) {
		t.Helper()
		m := submit(id, "", n)
		m.Build.DrvPath = n.DrvPath
		m.Build.Priority, m.Build.GlobalPriority = prio, global
		if r := a.one(pb.CommandType_COMMAND_TYPE_SUBMIT_BUILD, m); r.Err != nil {
			t.Fatal(r.Err)
		}
	}
	submitOne(1, 0, 0, featNode("old", "x86_64-linux"))
	submitOne(2, 0, 0, featNode("new", "x86_64-linux"))
	submitOne(3, 5, 0, featNode("prio5", "x86_64-linux"))
	submitOne(4, 0, 9, featNode("bumped", "x86_64-linux"))
	submitOne(5, 1, 0, featNode("kvm", "x86_64-linux", "kvm"))
	submitOne(6, 9, 0, featNode("big", "x86_64-linux", "big-parallel", "kvm"))
	submitOne(7, 0, 0, featNode("arm", "aarch64-linux"))
	submitOne(8, 3, 0, featNode("arm-kvm", "aarch64-linux", "kvm"))
	// A waiting step (input unbuilt) is never picked.
	m := submit(9, "waits", node("waits", "old"), node("old"))
	if r := a.one(pb.CommandType_COMMAND_TYPE_SUBMIT_BUILD, m); r.Err != nil {
		t.Fatal(r.Err)
	}
	name := func(steps []*pb.Step) []string {
		var out []string
		for _, s := range steps {
			for _, n := range []string{"old", "new", "prio5", "bumped", "kvm", "big", "arm", "arm-kvm", "waits"} {
				if s.DrvPath == drv(n) {
					out = append(out, n)
				}
			}
		}
		return out
	}
	tests := []struct {
		name  string
		agent *pb.Agent
		n     int
		skip  []string
		want  []string
	}{
		{"plain x86 agent: global priority, priority, age", &pb.Agent{Systems: []string{"x86_64-linux"}}, 10, nil, []string{"bumped", "prio5", "old", "new"}},
		{"x86 with kvm", &pb.Agent{Systems: []string{"x86_64-linux"}, SupportedFeatures: []string{"kvm"}}, 10, nil, []string{"bumped", "prio5", "kvm", "old", "new"}},
		{"kvm mandatory", &pb.Agent{Systems: []string{"x86_64-linux"}, SupportedFeatures: []string{"big-parallel", "kvm"}, MandatoryFeatures: []string{"kvm"}}, 10, nil, []string{"big", "kvm"}},
		{"two systems", &pb.Agent{Systems: []string{"aarch64-linux", "x86_64-linux"}, SupportedFeatures: []string{"kvm"}}, 3, nil, []string{"bumped", "prio5", "arm-kvm"}},
		{"limit and skip", &pb.Agent{Systems: []string{"x86_64-linux"}}, 2, []string{"bumped"}, []string{"prio5", "old"}},
		{"nothing fits", &pb.Agent{Systems: []string{"riscv64-linux"}}, 5, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			skip := map[string]bool{}
			for _, s := range tt.skip {
				skip[drv(s)] = true
			}
			got, err := a.f.Read().PickRunnable(nil, tt.agent, a.now, tt.n, func(d string) bool { return skip[d] }, nil)
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tt.want, name(got)); d != "" {
				t.Errorf("picked (-want +got):\n%s", d)
			}
		})
	}
}

// TestPickRunnableFairShare: at equal priority, the jobset using the least
// of its scheduling shares goes first, whatever the age.
func TestPickRunnableFairShare(t *testing.T) {
	a := newApplier(t)
	for i, js := range []string{"busy", "busy", "idle", "idle"} {
		n := node(fmt.Sprintf("%s-%d", js, i))
		m := submit(uint64(i+1), "", n)
		m.Build.DrvPath, m.Build.Project, m.Build.Jobset = n.DrvPath, "p", js
		if r := a.one(pb.CommandType_COMMAND_TYPE_SUBMIT_BUILD, m); r.Err != nil {
			t.Fatal(r.Err)
		}
	}
	agent := &pb.Agent{Systems: []string{"x86_64-linux"}}
	tests := []struct {
		name string
		fair *FairShare
		want []string
	}{
		{"no fair share: age", nil, []string{"busy-0", "busy-1", "idle-2"}},
		{"busy jobset runs two: idle first, then alternate", &FairShare{Running: map[string]int{"p:busy": 2}}, []string{"idle-2", "idle-3", "busy-0"}},
		{"busy has many more shares", &FairShare{Running: map[string]int{"p:busy": 2, "p:idle": 1}, Shares: map[string]int32{"p:busy": 1000}}, []string{"busy-0", "busy-1", "idle-2"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := a.f.Read().PickRunnable(nil, agent, a.now, 3, nil, tt.fair)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, s := range got {
				for _, n := range []string{"busy-0", "busy-1", "idle-2", "idle-3"} {
					if s.DrvPath == drv(n) {
						names = append(names, n)
					}
				}
			}
			if d := cmp.Diff(tt.want, names); d != "" {
				t.Errorf("picked (-want +got):\n%s", d)
			}
		})
	}
}

// BenchmarkPickRunnable: choosing work costs about the same with 10 and
// with 100,000 runnable steps.
func BenchmarkPickRunnable(b *testing.B) {
	for _, queued := range []int{10, 100000} {
		b.Run(fmt.Sprintf("runnable=%d", queued), func(b *testing.B) {
			a := newApplier(b)
			for i := 0; i < queued; i += 100 {
				var cmds []*pb.Command
				for j := i; j < i+100 && j < queued; j++ {
					n := node(fmt.Sprintf("s%d", j))
					if j%3 == 0 {
						n.RequiredFeatures = []string{"kvm"} // a group this agent cannot build
					}
					m := submit(uint64(j+1), "", n)
					m.Build.DrvPath = n.DrvPath
					cmds = append(cmds, cmd(b, pb.CommandType_COMMAND_TYPE_SUBMIT_BUILD, m, 1))
				}
				a.apply(cmds...)
			}
			agent := &pb.Agent{Systems: []string{"x86_64-linux"}}
			r := a.f.Read()
			for b.Loop() {
				got, err := r.PickRunnable(nil, agent, 10, 4, nil, nil)
				if err != nil || len(got) != 4 {
					b.Fatalf("picked %d, %v", len(got), err)
				}
			}
		})
	}
}
