package raftfsm

import (
	"errors"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"

	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

const (
	createEvalT = pb.CommandType_COMMAND_TYPE_CREATE_EVAL
	cancelEvalT = pb.CommandType_COMMAND_TYPE_CANCEL_EVAL
	restartT    = pb.CommandType_COMMAND_TYPE_RESTART_BUILD
	priorityT   = pb.CommandType_COMMAND_TYPE_SET_BUILD_PRIORITY
	triggerT    = pb.CommandType_COMMAND_TYPE_TRIGGER_JOBSETS
)

func withJobset(t *testing.T) *applier {
	a := newApplier(t)
	if r := a.one(pb.CommandType_COMMAND_TYPE_PUT_PROJECT, &pb.PutProject{Project: &pb.Project{Name: "p", Enabled: true}}); r.Err != nil {
		t.Fatal(r.Err)
	}
	if r := a.one(pb.CommandType_COMMAND_TYPE_PUT_JOBSET, &pb.PutJobset{Jobset: &pb.Jobset{Project: "p", Name: "j", Enabled: 1}}); r.Err != nil {
		t.Fatal(r.Err)
	}
	return a
}

func job(id uint64, name, top string, graph ...*pb.DerivationNode) *pb.SubmitBuild {
	sb := submit(id, top, graph...)
	sb.Build.Job = name
	return sb
}

func TestCreateEvalReusesUnchangedJobs(t *testing.T) {
	a := withJobset(t)
	r := a.one(createEvalT, &pb.CreateEval{Eval: &pb.Eval{Project: "p", Jobset: "j"}, Builds: []*pb.SubmitBuild{
		job(1, "a", "a", node("a")), job(2, "b", "b", node("a"), node("b", "a")),
	}})
	if r.Err != nil || r.ID != 1 {
		t.Fatalf("first eval: id %d, %v", r.ID, r.Err)
	}
	// b is unchanged, a has a new derivation.
	r = a.one(createEvalT, &pb.CreateEval{Eval: &pb.Eval{Project: "p", Jobset: "j"}, Builds: []*pb.SubmitBuild{
		job(3, "a", "a2", node("a2")), job(4, "b", "b", node("a"), node("b", "a")),
	}})
	if r.Err != nil || r.ID != 2 {
		t.Fatalf("second eval: id %d, %v", r.ID, r.Err)
	}
	e, err := a.f.Read().Eval(2)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]uint64{3, 2}, e.Builds); diff != "" || !e.HasNewBuilds {
		t.Errorf("eval 2 builds (-want +got):\n%s hasnewbuilds %v", diff, e.HasNewBuilds)
	}
	if diff := cmp.Diff([]uint64{1, 2}, a.build(2).EvalIds); diff != "" {
		t.Errorf("build 2 evals (-want +got):\n%s", diff)
	}
	if _, err := a.f.Read().Build(4); !errors.Is(err, ErrNotFound) {
		t.Errorf("a reused job made build 4: %v", err)
	}
	// The same jobs again: nothing new.
	r = a.one(createEvalT, &pb.CreateEval{Eval: &pb.Eval{Project: "p", Jobset: "j"}, Builds: []*pb.SubmitBuild{
		job(5, "a", "a2", node("a2")), job(6, "b", "b", node("a"), node("b", "a")),
	}})
	if e, _ := a.f.Read().Eval(r.ID); r.Err != nil || e.HasNewBuilds {
		t.Errorf("third eval: %v, hasnewbuilds %v", r.Err, e.GetHasNewBuilds())
	}
	if latest, err := a.f.Read().LatestEval("p", "j"); err != nil || latest.Id != 3 {
		t.Errorf("latest eval %v, %v", latest, err)
	}
}

func TestEvalCommandsRefuseBadInputAndChangeNothing(t *testing.T) {
	a := withJobset(t)
	before := a.dump()
	cases := []struct {
		name string
		typ  pb.CommandType
		m    proto.Message
		want error
	}{
		{"eval of unknown jobset", createEvalT, &pb.CreateEval{Eval: &pb.Eval{Project: "p", Jobset: "nope"}}, ErrNotFound},
		{"eval without eval", createEvalT, &pb.CreateEval{}, ErrInvalid},
		{"duplicate job", createEvalT, &pb.CreateEval{Eval: &pb.Eval{Project: "p", Jobset: "j"}, Builds: []*pb.SubmitBuild{job(1, "a", "a", node("a")), job(2, "a", "a", node("a"))}}, ErrInvalid},
		{"job of another jobset", createEvalT, &pb.CreateEval{Eval: &pb.Eval{Project: "p", Jobset: "j"}, Builds: []*pb.SubmitBuild{{Build: &pb.Build{Id: 1, Job: "a", Jobset: "x", DrvPath: drv("a")}, Graph: []*pb.DerivationNode{node("a")}}}}, ErrInvalid},
		{"job with missing input", createEvalT, &pb.CreateEval{Eval: &pb.Eval{Project: "p", Jobset: "j"}, Builds: []*pb.SubmitBuild{job(1, "a", "b", node("b", "a"))}}, ErrInvalid},
		{"cancel unknown eval", cancelEvalT, &pb.CancelEval{Id: 9}, ErrNotFound},
		{"restart unknown build", restartT, &pb.RestartBuild{Id: 9}, ErrNotFound},
		{"priority of unknown build", priorityT, &pb.SetBuildPriority{Id: 9, Bump: true}, ErrNotFound},
		{"priority without change", priorityT, &pb.SetBuildPriority{Id: 9}, ErrInvalid},
		{"trigger unknown jobset", triggerT, &pb.TriggerJobsets{Jobsets: []string{"p:j", "p:nope"}}, ErrNotFound},
		{"trigger malformed", triggerT, &pb.TriggerJobsets{Jobsets: []string{"pj"}}, ErrInvalid},
		{"trigger nothing", triggerT, &pb.TriggerJobsets{}, ErrInvalid},
		{"user without hash", pb.CommandType_COMMAND_TYPE_PUT_USER, &pb.PutUser{User: &pb.User{Name: "u"}}, ErrInvalid},
		{"user with unknown role", pb.CommandType_COMMAND_TYPE_PUT_USER, &pb.PutUser{User: &pb.User{Name: "u", PasswordHash: []byte("$2a$x"), Roles: []string{"god"}}}, ErrInvalid},
		{"delete unknown user", pb.CommandType_COMMAND_TYPE_DELETE_USER, &pb.DeleteUser{Name: "u"}, ErrNotFound},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := a.one(tc.typ, tc.m)
			if !errors.Is(r.Err, tc.want) {
				t.Errorf("got %v, want %v", r.Err, tc.want)
			}
			if diff := diffDumps(before, a.dump()); diff != "" {
				t.Errorf("state changed (-before +after):\n%s", diff)
			}
		})
	}
}

func TestBuildActions(t *testing.T) {
	a := withJobset(t)
	if r := a.one(createEvalT, &pb.CreateEval{Eval: &pb.Eval{Project: "p", Jobset: "j"}, Builds: []*pb.SubmitBuild{
		job(1, "d", "d", diamond()[:4]...), job(2, "b", "b", node("a"), node("b", "a")),
	}}); r.Err != nil {
		t.Fatal(r.Err)
	}
	// Priority and bump reach the steps the scheduler orders.
	if r := a.one(priorityT, &pb.SetBuildPriority{Id: 1, SetPriority: true, Priority: 7}); r.Err != nil {
		t.Fatal(r.Err)
	}
	if s, _ := a.f.Read().Step(drv("c")); s.Priority != 7 {
		t.Errorf("step c priority %d, want 7", s.Priority)
	}
	if r := a.one(priorityT, &pb.SetBuildPriority{Id: 2, Bump: true}); r.Err != nil {
		t.Fatal(r.Err)
	}
	if s, _ := a.f.Read().Step(drv("a")); s.GlobalPriority != a.now || s.Priority != 7 {
		t.Errorf("shared step a: global %d priority %d, want %d and 7", s.GlobalPriority, s.Priority, a.now)
	}
	// a fails: both builds finish failed; the failed attempt's number is kept.
	l := a.grant("a")
	if err := a.complete(l, pb.LeaseOutcome_LEASE_OUTCOME_FAILED); err != nil {
		t.Fatal(err)
	}
	if b := a.build(1); b.State != pb.BuildState_BUILD_STATE_FINISHED || b.BuildStatus != 2 {
		t.Fatalf("build 1 after failure: %v", b)
	}
	for _, m := range []struct {
		typ pb.CommandType
		m   proto.Message
	}{{priorityT, &pb.SetBuildPriority{Id: 1, Bump: true}}, {cancelEvalT, &pb.CancelEval{Id: 1}}, {pb.CommandType_COMMAND_TYPE_CANCEL_BUILD, &pb.CancelBuild{Id: 1}}} {
		if r := a.one(m.typ, m.m); !errors.Is(r.Err, ErrConflict) {
			t.Errorf("%s on a finished build: %v, want conflict", m.typ, r.Err)
		}
	}
	// Restart: queued again, the failed steps get a fresh attempt whose
	// number follows the earlier one.
	if r := a.one(restartT, &pb.RestartBuild{Id: 1}); r.Err != nil {
		t.Fatal(r.Err)
	}
	b := a.build(1)
	if b.State != pb.BuildState_BUILD_STATE_QUEUED || b.Restarts != 1 || b.StateHistory[len(b.StateHistory)-1].State != "restarted" {
		t.Errorf("restarted build: %v", b)
	}
	if r := a.one(restartT, &pb.RestartBuild{Id: 1}); !errors.Is(r.Err, ErrConflict) {
		t.Errorf("restart of a queued build: %v, want conflict", r.Err)
	}
	if got := a.state("a"); got != pb.StepState_STEP_STATE_RUNNABLE {
		t.Errorf("step a after restart: %s", got)
	}
	if got := a.state("d"); got != pb.StepState_STEP_STATE_WAITING {
		t.Errorf("step d after restart: %s", got)
	}
	l2 := a.grant("a")
	lease, err := a.f.Read().Lease(l2)
	if err != nil || lease.Attempt != 2 {
		t.Errorf("attempt after restart: %v, %v (want 2)", lease, err)
	}
	// Cancelling the evaluation cancels what is unfinished.
	if r := a.one(cancelEvalT, &pb.CancelEval{Id: 1}); r.Err != nil {
		t.Fatal(r.Err)
	}
	if b := a.build(1); b.State != pb.BuildState_BUILD_STATE_FINISHED || b.BuildStatus != 4 {
		t.Errorf("build 1 after eval cancel: %v", b)
	}
	if e, _ := a.f.Read().Eval(1); !e.Cancelled {
		t.Errorf("eval not marked cancelled")
	}
	// A push trigger is recorded, and cleared by the next evaluation.
	if r := a.one(triggerT, &pb.TriggerJobsets{Jobsets: []string{"p:j"}}); r.Err != nil || r.ID != 1 {
		t.Fatalf("trigger: %d %v", r.ID, r.Err)
	}
	if js, _ := a.f.Read().Jobset("p", "j"); js.TriggerTime != a.now {
		t.Errorf("trigger time %d, want %d", js.TriggerTime, a.now)
	}
}
