package raftfsm

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// gen produces random command sequences that read the state they are
// applied to, so they exercise real transitions (and plenty of errors).
type gen struct {
	r      *rand.Rand
	f      *FSM
	pool   []*pb.DerivationNode // a DAG: node i only depends on nodes < i
	nextID uint64
	leases []uint64 // every lease id ever granted, for stale completions
}

func newGen(seed uint64, f *FSM) *gen {
	g := &gen{r: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), f: f}
	for i := 0; i < 30; i++ {
		var ins []string
		for j := 0; j < i; j++ {
			if g.r.IntN(8) == 0 {
				ins = append(ins, fmt.Sprintf("p%d-%d", seed, j))
			}
		}
		n := node(fmt.Sprintf("p%d-%d", seed, i), ins...)
		if g.r.IntN(5) == 0 {
			n.RequiredFeatures = []string{"kvm", "big-parallel"}[:1+g.r.IntN(2)]
		}
		g.pool = append(g.pool, n)
	}
	return g
}

func (g *gen) pick(states ...pb.StepState) *pb.Step {
	var cands []*pb.Step
	for _, st := range states {
		each, err := g.f.Read().StepsIn(nil, st)
		if err != nil {
			panic(err)
		}
		each(func(s StepRef) bool { cands = append(cands, s.Step()); return true })
	}
	if len(cands) == 0 {
		return nil
	}
	return cands[g.r.IntN(len(cands))]
}

// closureGraph is the pool closure of node i.
func (g *gen) closureGraph(i int) []*pb.DerivationNode {
	need := map[string]bool{g.pool[i].DrvPath: true}
	var out []*pb.DerivationNode
	for j := i; j >= 0; j-- {
		if need[g.pool[j].DrvPath] {
			out = append(out, g.pool[j])
			for _, in := range g.pool[j].InputDrvs {
				need[in] = true
			}
		}
	}
	return out
}

func (g *gen) command(now int64) *pb.Command {
	c := func(t pb.CommandType, m proto.Message) *pb.Command {
		cmd, err := NewCommand(t, m, now)
		if err != nil {
			panic(err)
		}
		return cmd
	}
	if g.r.IntN(8) == 0 {
		return g.cacheCommand(c)
	}
	if g.r.IntN(8) == 0 {
		return g.evalCommand(c)
	}
	switch k := g.r.IntN(100); {
	case k < 25: // submit
		i := g.r.IntN(len(g.pool))
		g.nextID++
		id := g.nextID
		graph := g.closureGraph(i)
		switch g.r.IntN(12) {
		case 0: // duplicate id
			id = max(1, id-1)
		case 1: // bad path
			graph = append([]*pb.DerivationNode{{DrvPath: "/nix/store/bad.drv", System: "x", Outputs: []*pb.Output{{Name: "out", Path: storePath("x")}}}}, graph...)
		case 2: // missing input
			graph = graph[:1]
		case 3: // cycle
			a := node(fmt.Sprintf("cyc-a-%d", id), fmt.Sprintf("cyc-b-%d", id))
			b := node(fmt.Sprintf("cyc-b-%d", id), fmt.Sprintf("cyc-a-%d", id))
			return c(pb.CommandType_COMMAND_TYPE_SUBMIT_BUILD, &pb.SubmitBuild{Build: &pb.Build{Id: id, DrvPath: a.DrvPath}, Graph: []*pb.DerivationNode{a, b}})
		}
		return c(pb.CommandType_COMMAND_TYPE_SUBMIT_BUILD, &pb.SubmitBuild{Build: &pb.Build{Id: id, DrvPath: g.pool[i].DrvPath, Job: fmt.Sprintf("job%d", i), Priority: int32(g.r.IntN(3))}, Graph: graph})
	case k < 32: // cancel
		return c(pb.CommandType_COMMAND_TYPE_CANCEL_BUILD, &pb.CancelBuild{Id: 1 + g.r.Uint64N(g.nextID+2), Reason: "test"})
	case k < 52: // grant
		s := g.pick(pb.StepState_STEP_STATE_RUNNABLE, pb.StepState_STEP_STATE_WAITING)
		d := drv("nothing")
		if s != nil {
			d = s.DrvPath
		}
		return c(pb.CommandType_COMMAND_TYPE_GRANT_LEASE, &pb.GrantLease{AgentId: fmt.Sprintf("agent%d", g.r.IntN(3)), DrvPath: d, TtlSeconds: 30})
	case k < 75: // complete
		var id uint64
		if s := g.pick(pb.StepState_STEP_STATE_LEASED); s != nil && g.r.IntN(5) > 0 {
			id = s.LeaseId
		} else if len(g.leases) > 0 {
			id = g.leases[g.r.IntN(len(g.leases))] // stale or repeated
		}
		outcome := []pb.LeaseOutcome{pb.LeaseOutcome_LEASE_OUTCOME_SUCCEEDED, pb.LeaseOutcome_LEASE_OUTCOME_SUCCEEDED,
			pb.LeaseOutcome_LEASE_OUTCOME_FAILED, pb.LeaseOutcome_LEASE_OUTCOME_TRANSIENT, pb.LeaseOutcome_LEASE_OUTCOME_TIMED_OUT,
			pb.LeaseOutcome_LEASE_OUTCOME_RELEASED}[g.r.IntN(6)]
		return c(pb.CommandType_COMMAND_TYPE_COMPLETE_LEASE, &pb.CompleteLease{LeaseId: id, Outcome: outcome, Error: "e", MaxTries: 3, BackoffSeconds: int64(g.r.IntN(3))})
	case k < 82: // expire
		var id uint64
		if s := g.pick(pb.StepState_STEP_STATE_LEASED); s != nil {
			id = s.LeaseId
		}
		return c(pb.CommandType_COMMAND_TYPE_EXPIRE_LEASE, &pb.ExpireLease{LeaseId: id, MaxTries: 3, BackoffSeconds: 1})
	case k < 87:
		return c(pb.CommandType_COMMAND_TYPE_PUT_PROJECT, &pb.PutProject{Project: &pb.Project{Name: fmt.Sprintf("proj%d", g.r.IntN(4)), DisplayName: fmt.Sprint(g.r.IntN(100)), Enabled: true}})
	case k < 89:
		return c(pb.CommandType_COMMAND_TYPE_DELETE_PROJECT, &pb.DeleteProject{Name: fmt.Sprintf("proj%d", g.r.IntN(4))})
	case k < 93:
		return c(pb.CommandType_COMMAND_TYPE_PUT_JOBSET, &pb.PutJobset{Jobset: &pb.Jobset{Project: fmt.Sprintf("proj%d", g.r.IntN(4)), Name: fmt.Sprintf("js%d", g.r.IntN(3)), Enabled: int32(g.r.IntN(5)), KeepNr: 3}})
	case k < 95:
		return c(pb.CommandType_COMMAND_TYPE_DELETE_JOBSET, &pb.DeleteJobset{Project: fmt.Sprintf("proj%d", g.r.IntN(4)), Name: fmt.Sprintf("js%d", g.r.IntN(3))})
	case k < 97:
		return c(pb.CommandType_COMMAND_TYPE_PUT_NODE, &pb.PutNode{Node: &pb.Node{Id: fmt.Sprintf("n%d", g.r.IntN(3)), RaftAddr: "127.0.0.1:1", HttpAddr: fmt.Sprintf("127.0.0.1:%d", g.r.IntN(9))}})
	case k < 98:
		return c(pb.CommandType_COMMAND_TYPE_DELETE_NODE, &pb.DeleteNode{Id: fmt.Sprintf("n%d", g.r.IntN(3))})
	case k < 99:
		return &pb.Command{Type: pb.CommandType(900), Ignorable: true, Payload: []byte{0xff}, Now: now}
	}
	return c(pb.CommandType_COMMAND_TYPE_NOOP, &pb.Noop{})
}

// cacheCommand pushes, pins, unpins, logs or collects garbage on outputs of the pool.
func (g *gen) cacheCommand(c func(pb.CommandType, proto.Message) *pb.Command) *pb.Command {
	i := g.r.IntN(len(g.pool))
	n := g.pool[i]
	switch g.r.IntN(6) {
	case 0, 1:
		var refs []string
		for _, in := range n.InputDrvs {
			refs = append(refs, strings.TrimPrefix(strings.TrimSuffix(in, ".drv"), StoreDir+"/"))
		}
		slices.Sort(refs)
		ni := testNarInfo(n.Outputs[0].Path, refs...)
		if g.r.IntN(6) == 0 {
			ni.Url = "nar/bad.nar.zst"
		}
		return c(pb.CommandType_COMMAND_TYPE_PUT_NAR_INFO, &pb.PutNarInfo{NarInfo: ni})
	case 2:
		return c(pb.CommandType_COMMAND_TYPE_PIN_PATH, &pb.PinPath{Pin: &pb.Pin{StorePath: n.Outputs[0].Path, Reason: "r"}})
	case 3:
		return c(pb.CommandType_COMMAND_TYPE_UNPIN_PATH, &pb.UnpinPath{StorePath: n.Outputs[0].Path})
	case 4:
		return c(pb.CommandType_COMMAND_TYPE_PUT_LOG, &pb.PutLog{Log: &pb.LogRecord{DrvPath: n.DrvPath, Blob: testBlob(n.DrvPath), Size: 10}})
	}
	return c(pb.CommandType_COMMAND_TYPE_COLLECT_GARBAGE, &pb.CollectGarbage{GraceSeconds: int64(g.r.IntN(4)), MaxDeletes: uint32(1 + g.r.IntN(4))})
}

// evalCommand records evaluations and runs the self-serve actions on them.
func (g *gen) evalCommand(c func(pb.CommandType, proto.Message) *pb.Command) *pb.Command {
	switch g.r.IntN(6) {
	case 0, 1:
		ev := &pb.CreateEval{Eval: &pb.Eval{Project: fmt.Sprintf("proj%d", g.r.IntN(2)), Jobset: fmt.Sprintf("js%d", g.r.IntN(2)), EvalTime: 1}}
		for _, i := range []int{g.r.IntN(len(g.pool)), g.r.IntN(len(g.pool))} {
			if i2 := len(ev.Builds); i2 == 1 && ev.Builds[0].Build.Job == fmt.Sprintf("job%d", i) {
				continue
			}
			g.nextID++
			ev.Builds = append(ev.Builds, &pb.SubmitBuild{Build: &pb.Build{Id: g.nextID, DrvPath: g.pool[i].DrvPath, Job: fmt.Sprintf("job%d", i)}, Graph: g.closureGraph(i)})
		}
		return c(pb.CommandType_COMMAND_TYPE_CREATE_EVAL, ev)
	case 2:
		return c(pb.CommandType_COMMAND_TYPE_CANCEL_EVAL, &pb.CancelEval{Id: 1 + g.r.Uint64N(5)})
	case 3:
		return c(pb.CommandType_COMMAND_TYPE_RESTART_BUILD, &pb.RestartBuild{Id: 1 + g.r.Uint64N(g.nextID+1)})
	case 4:
		return c(pb.CommandType_COMMAND_TYPE_SET_BUILD_PRIORITY, &pb.SetBuildPriority{Id: 1 + g.r.Uint64N(g.nextID+1), SetPriority: g.r.IntN(2) == 0, Priority: int32(g.r.IntN(5)), Bump: g.r.IntN(2) == 0})
	}
	return c(pb.CommandType_COMMAND_TYPE_TRIGGER_JOBSETS, &pb.TriggerJobsets{Jobsets: []string{fmt.Sprintf("proj%d:js%d", g.r.IntN(2), g.r.IntN(2))}})
}

type resultKey struct {
	ID   uint64
	Kind string
}

// TestPropertyReplayAndSnapshot: random command sequences, applied in
// random groupings, give the same state and results on a second FSM fed
// one entry at a time, and on an FSM restored from a snapshot.
func TestPropertyReplayAndSnapshot(t *testing.T) {
	allTransitions := map[string]int{}
	defer func() {
		// The rarer commands, over all seeds.
		for _, k := range []string{"COMMAND_TYPE_CREATE_EVAL", "COMMAND_TYPE_CANCEL_EVAL", "COMMAND_TYPE_RESTART_BUILD", "COMMAND_TYPE_SET_BUILD_PRIORITY", "COMMAND_TYPE_TRIGGER_JOBSETS"} {
			if allTransitions[k] == 0 {
				t.Errorf("no seed produced %s: %v", k, allTransitions)
			}
		}
	}()
	for seed := uint64(1); seed <= 12; seed++ {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			a := New(nil)
			g := newGen(seed, a)
			var logs []*raft.Log
			var results []resultKey
			now := int64(1000)
			transitions := map[string]int{}
			for index := uint64(1); len(logs) < 150; index++ {
				n := 1 + g.r.IntN(6)
				var cmds []*pb.Command
				for i := 0; i < n; i++ {
					now += int64(g.r.IntN(2))
					cmds = append(cmds, g.command(now))
				}
				data, err := EncodeEntry(cmds)
				if err != nil {
					t.Fatal(err)
				}
				l := &raft.Log{Type: raft.LogCommand, Index: index, Data: data}
				logs = append(logs, l)
				// Apply as we go (the generator reads A's state), one
				// ApplyBatch of this single entry.
				res := a.ApplyBatch([]*raft.Log{l})[0].(*EntryResult)
				for i, r := range res.Results {
					results = append(results, resultKey{r.ID, Kind(r.Err)})
					if r.Err == nil {
						transitions[cmds[i].Type.String()]++
						if cmds[i].Type == pb.CommandType_COMMAND_TYPE_GRANT_LEASE {
							g.leases = append(g.leases, r.ID)
						}
					} else {
						transitions["error:"+Kind(r.Err)]++
					}
				}
			}
			checkInvariants(t, a)
			for k, n := range transitions {
				allTransitions[k] += n
			}
			// Meaningful mix: successes of the important commands and errors.
			for _, k := range []string{"COMMAND_TYPE_SUBMIT_BUILD", "COMMAND_TYPE_GRANT_LEASE", "COMMAND_TYPE_COMPLETE_LEASE", "COMMAND_TYPE_PUT_NAR_INFO", "COMMAND_TYPE_COLLECT_GARBAGE", "error:invalid", "error:stale_lease"} {
				if transitions[k] == 0 {
					t.Errorf("seed %d never produced %s: %v", seed, k, transitions)
				}
			}

			// (b) the same log, fed in other groupings, to a fresh FSM.
			b := New(nil)
			var got []resultKey
			for i := 0; i < len(logs); {
				n := 1 + g.r.IntN(8)
				if i+n > len(logs) {
					n = len(logs) - i
				}
				var out []any
				if n == 1 {
					out = []any{b.Apply(logs[i])}
				} else {
					out = b.ApplyBatch(logs[i : i+n])
				}
				for _, o := range out {
					for _, r := range o.(*EntryResult).Results {
						got = append(got, resultKey{r.ID, Kind(r.Err)})
					}
				}
				i += n
			}
			if diff := cmp.Diff(results, got); diff != "" {
				t.Fatalf("results differ on replay (-first +replay):\n%s", diff)
			}
			da, _ := a.Read().Dump()
			db, _ := b.Read().Dump()
			if diff := diffDumps(da, db); diff != "" {
				t.Fatalf("replayed state differs:\n%s", diff)
			}
			if a.AppliedIndex() != b.AppliedIndex() {
				t.Fatalf("applied index %d vs %d", a.AppliedIndex(), b.AppliedIndex())
			}

			// (a) snapshot and restore.
			c := restoreFrom(t, snapshotBytes(t, a))
			dc, _ := c.Read().Dump()
			if diff := diffDumps(da, dc); diff != "" {
				t.Fatalf("restored state differs:\n%s", diff)
			}
			if c.AppliedIndex() != a.AppliedIndex() {
				t.Fatalf("restored applied index %d, want %d", c.AppliedIndex(), a.AppliedIndex())
			}
		})
	}
}

// checkInvariants verifies the bookkeeping the scheduler relies on.
func checkInvariants(t *testing.T, f *FSM) {
	t.Helper()
	d, err := f.Read().Dump()
	if err != nil {
		t.Fatal(err)
	}
	steps := map[string]*pb.Step{}
	for _, s := range d.Steps {
		steps[s.DrvPath] = s
	}
	leases := map[uint64]*pb.Lease{}
	for _, l := range d.Leases {
		leases[l.Id] = l
		if s := steps[l.DrvPath]; s == nil || s.State != pb.StepState_STEP_STATE_LEASED || s.LeaseId != l.Id {
			t.Errorf("lease %d points at step %v", l.Id, s)
		}
	}
	for _, s := range d.Steps {
		if !terminal(s.State) && s.Refs == 0 {
			t.Errorf("unfinished step %s (%s) has no refs", s.DrvPath, s.State)
		}
		if s.State == pb.StepState_STEP_STATE_LEASED && leases[s.LeaseId] == nil {
			t.Errorf("leased step %s has no lease record %d", s.DrvPath, s.LeaseId)
		}
		if s.State == pb.StepState_STEP_STATE_WAITING || s.State == pb.StepState_STEP_STATE_RUNNABLE {
			pending := 0
			for _, in := range s.InputDrvs {
				if steps[in].GetState() != pb.StepState_STEP_STATE_SUCCEEDED {
					pending++
				}
			}
			if uint32(pending) != s.PendingInputs {
				t.Errorf("step %s: pending_inputs %d, actually %d", s.DrvPath, s.PendingInputs, pending)
			}
			if (pending == 0) != (s.State == pb.StepState_STEP_STATE_RUNNABLE) {
				t.Errorf("step %s is %s with %d pending inputs", s.DrvPath, s.State, pending)
			}
		}
	}
	builds := map[uint64]*pb.Build{}
	for _, b := range d.Builds {
		builds[b.Id] = b
	}
	for _, e := range d.Evals {
		for _, id := range e.Builds {
			if b := builds[id]; b == nil || !slices.Contains(b.EvalIds, e.Id) {
				t.Errorf("evaluation %d lists build %d, which is %v", e.Id, id, b)
			}
		}
	}
	for _, b := range d.Builds {
		if b.State == pb.BuildState_BUILD_STATE_QUEUED {
			if s := steps[b.DrvPath]; s == nil || terminal(s.State) {
				t.Errorf("queued build %d has top step %v", b.Id, s)
			}
		}
	}
}
