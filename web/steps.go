package web

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// StepJSON is one derivation of a build's closure.
type StepJSON struct {
	DrvPath          string            `json:"drv_path"`
	System           string            `json:"system"`
	RequiredFeatures []string          `json:"required_features"`
	State            string            `json:"state"`
	Tries            uint32            `json:"tries"`
	Attempts         uint32            `json:"attempts"`
	BuildStatus      *int32            `json:"buildstatus,omitempty"`
	LastError        string            `json:"last_error,omitempty"`
	Outputs          map[string]string `json:"outputs"`
	CreatedAt        int64             `json:"created_at"`
	StartedAt        int64             `json:"started_at,omitempty"`
	FinishedAt       int64             `json:"finished_at,omitempty"`
	LeaseID          uint64            `json:"lease_id,omitempty"`
	NotBefore        int64             `json:"not_before,omitempty"`
	PendingInputs    uint32            `json:"pending_inputs"`
	WaitingReason    string            `json:"waiting_reason,omitempty"`
	Logs             string            `json:"logs"`
}

var stepStates = map[pb.StepState]string{
	pb.StepState_STEP_STATE_WAITING: "waiting", pb.StepState_STEP_STATE_RUNNABLE: "runnable",
	pb.StepState_STEP_STATE_LEASED: "running", pb.StepState_STEP_STATE_SUCCEEDED: "succeeded",
	pb.StepState_STEP_STATE_FAILED: "failed", pb.StepState_STEP_STATE_CANCELLED: "cancelled",
}

func stepJSON(rd *raftfsm.Reader, s *pb.Step, wr *waitContext) StepJSON {
	j := StepJSON{DrvPath: s.DrvPath, System: s.System, RequiredFeatures: s.RequiredFeatures, State: stepStates[s.State],
		Tries: s.Tries, Attempts: s.Attempts, LastError: s.LastError, Outputs: map[string]string{}, CreatedAt: s.CreatedAt,
		StartedAt: s.StartedAt, FinishedAt: s.FinishedAt, NotBefore: s.NotBefore, PendingInputs: s.PendingInputs,
		Logs: "/api/v1/steps/" + strings.TrimPrefix(s.DrvPath, raftfsm.StoreDir+"/") + "/logs"}
	if j.RequiredFeatures == nil {
		j.RequiredFeatures = []string{}
	}
	if s.State == pb.StepState_STEP_STATE_LEASED {
		j.LeaseID = s.LeaseId
	}
	if s.State == pb.StepState_STEP_STATE_FAILED {
		st := s.BuildStatus
		j.BuildStatus = &st
	}
	for _, o := range s.Outputs {
		j.Outputs[o.Name] = o.Path
	}
	j.WaitingReason = wr.reason(rd, s)
	return j
}

// waitContext is what explaining a step's wait needs: the live agents and
// how busy each is.
type waitContext struct {
	now    time.Time
	known  bool // false when the leader could not say which agents live
	last   map[string]time.Time
	agents []*pb.Agent
	leases map[string]int // agent → active leases
}

func (a *api) waitingReasons(ctx context.Context, rd *raftfsm.Reader) *waitContext {
	wc := &waitContext{now: time.Now(), leases: map[string]int{}}
	last, known := a.cfg.Backend.LiveAgents(ctx)
	wc.known, wc.last = known, last
	agents, err := rd.Agents()
	if err != nil {
		return wc
	}
	for _, ag := range agents {
		if _, ok := last[ag.Id]; ok {
			wc.agents = append(wc.agents, ag)
		}
	}
	if ls, err := rd.Leases(); err == nil {
		for _, l := range ls {
			wc.leases[l.AgentId]++
		}
	}
	return wc
}

// reason says why an unfinished step is not done yet ("" for finished ones).
func (wc *waitContext) reason(rd *raftfsm.Reader, s *pb.Step) string {
	switch s.State {
	case pb.StepState_STEP_STATE_WAITING:
		return fmt.Sprintf("inputs not built yet (%d of %d)", s.PendingInputs, len(s.InputDrvs))
	case pb.StepState_STEP_STATE_LEASED:
		l, err := rd.Lease(s.LeaseId)
		if err != nil {
			return "running"
		}
		return fmt.Sprintf("running on agent %s (lease %d, attempt %d)", l.AgentId, l.Id, l.Attempt)
	case pb.StepState_STEP_STATE_RUNNABLE:
	default:
		return ""
	}
	if s.NotBefore > wc.now.Unix() {
		return "backing off after a transient failure until " + time.Unix(s.NotBefore, 0).UTC().Format(time.RFC3339)
	}
	reason, _ := wc.placement(s.System, s.RequiredFeatures)
	return reason
}

// placement says whether a runnable step of this system and feature set
// would be leased now, and if not, why.
func (wc *waitContext) placement(system string, features []string) (reason string, now bool) {
	if !wc.known {
		return "runnable; which agents are live is unknown (no leader reachable)", false
	}
	var forSystem, fitting []*pb.Agent
	for _, ag := range wc.agents {
		if slices.Contains(ag.Systems, system) {
			forSystem = append(forSystem, ag)
		}
		if raftfsm.Fits(ag, system, features) {
			fitting = append(fitting, ag)
		}
	}
	if len(forSystem) == 0 {
		return "no agent for system " + system, false
	}
	if len(fitting) == 0 {
		for _, f := range features {
			if !slices.ContainsFunc(forSystem, func(ag *pb.Agent) bool { return slices.Contains(ag.SupportedFeatures, f) }) {
				return "no agent with feature " + f, false
			}
		}
		return "no agent for system " + system + " with exactly these mandatory features", false
	}
	for _, ag := range fitting {
		if wc.leases[ag.Id] < int(max(ag.MaxJobs, 1)) {
			return "about to be leased", true
		}
	}
	return fmt.Sprintf("all fitting agents busy (%d)", len(fitting)), false
}

// buildSteps lists the steps of a build's derivation closure, in a
// depth-first walk from the top (the numbering of /build/{id}/nixlog/{n}).
func (a *api) buildSteps(w http.ResponseWriter, r *http.Request) {
	b, ok := a.buildOf(w, r)
	if !ok {
		return
	}
	rd := a.cfg.Backend.Read()
	steps, err := closureSteps(rd, b.DrvPath, maxClosureSteps)
	if err != nil {
		WriteError(w, err)
		return
	}
	wr := a.waitingReasons(r.Context(), rd)
	out := make([]StepJSON, len(steps))
	for i, s := range steps {
		out[i] = stepJSON(rd, s, wr)
	}
	WriteJSON(w, http.StatusOK, map[string]any{"build": b.Id, "steps": out})
}

const maxClosureSteps = 100000

// closureSteps walks the known steps of root's closure depth-first, at
// most limit of them.
func closureSteps(rd *raftfsm.Reader, root string, limit int) ([]*pb.Step, error) {
	var out []*pb.Step
	seen := map[string]bool{root: true}
	stack := []string{root}
	for len(stack) > 0 && len(out) < limit {
		drv := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		s, err := rd.Step(drv)
		if errors.Is(err, raftfsm.ErrNotFound) {
			continue // built before this build was submitted
		}
		if err != nil {
			return nil, err
		}
		out = append(out, s)
		for i := len(s.InputDrvs) - 1; i >= 0; i-- {
			if in := s.InputDrvs[i]; !seen[in] {
				seen[in] = true
				stack = append(stack, in)
			}
		}
	}
	return out, nil
}
