package web

import (
	"errors"
	"net/http"

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
	BuildStatus      *int32            `json:"buildstatus,omitempty"`
	LastError        string            `json:"last_error,omitempty"`
	Outputs          map[string]string `json:"outputs"`
	StartedAt        int64             `json:"started_at,omitempty"`
	FinishedAt       int64             `json:"finished_at,omitempty"`
	LeaseID          uint64            `json:"lease_id,omitempty"`
}

var stepStates = map[pb.StepState]string{
	pb.StepState_STEP_STATE_WAITING: "waiting", pb.StepState_STEP_STATE_RUNNABLE: "runnable",
	pb.StepState_STEP_STATE_LEASED: "running", pb.StepState_STEP_STATE_SUCCEEDED: "succeeded",
	pb.StepState_STEP_STATE_FAILED: "failed", pb.StepState_STEP_STATE_CANCELLED: "cancelled",
}

func stepJSON(s *pb.Step) StepJSON {
	j := StepJSON{DrvPath: s.DrvPath, System: s.System, RequiredFeatures: s.RequiredFeatures, State: stepStates[s.State],
		Tries: s.Tries, LastError: s.LastError, Outputs: map[string]string{}, StartedAt: s.StartedAt, FinishedAt: s.FinishedAt, LeaseID: s.LeaseId}
	if j.RequiredFeatures == nil {
		j.RequiredFeatures = []string{}
	}
	if s.State == pb.StepState_STEP_STATE_FAILED {
		st := s.BuildStatus
		j.BuildStatus = &st
	}
	for _, o := range s.Outputs {
		j.Outputs[o.Name] = o.Path
	}
	return j
}

// buildSteps lists the steps of a build's derivation closure (inputs
// first is not promised; the order is a depth-first walk from the top).
func (a *api) buildSteps(w http.ResponseWriter, r *http.Request) {
	id, err := pathID(r)
	if err != nil {
		WriteError(w, err)
		return
	}
	rd := a.cfg.Backend.Read()
	b, err := rd.Build(id)
	if err != nil {
		WriteError(w, err)
		return
	}
	out := []StepJSON{}
	seen := map[string]bool{b.DrvPath: true}
	stack := []string{b.DrvPath}
	for len(stack) > 0 && len(out) < 100000 {
		drv := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		s, err := rd.Step(drv)
		if errors.Is(err, raftfsm.ErrNotFound) {
			continue // built before this build was submitted
		}
		if err != nil {
			WriteError(w, err)
			return
		}
		out = append(out, stepJSON(s))
		for _, in := range s.InputDrvs {
			if !seen[in] {
				seen[in] = true
				stack = append(stack, in)
			}
		}
	}
	WriteJSON(w, http.StatusOK, map[string]any{"build": id, "steps": out})
}
