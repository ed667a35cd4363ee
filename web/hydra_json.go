package web

import (
	"maps"
	"slices"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// The shapes of Hydra's JSON API (web/openapi/hydra-api.yaml): field names
// are Hydra's, not ours.

type hydraProject struct {
	Name                    string   `json:"name"`
	DisplayName             string   `json:"displayname"`
	Description             string   `json:"description"`
	Homepage                string   `json:"homepage"`
	Owner                   string   `json:"owner"`
	Enabled                 bool     `json:"enabled"`
	Hidden                  bool     `json:"hidden"`
	EnableDynamicRunCommand bool     `json:"enable_dynamic_run_command"`
	Jobsets                 []string `json:"jobsets"`
}

func toHydraProject(p *pb.Project, jobsets []*pb.Jobset) hydraProject {
	out := hydraProject{Name: p.Name, DisplayName: p.DisplayName, Description: p.Description, Homepage: p.Homepage,
		Owner: p.Owner, Enabled: p.Enabled, Hidden: p.Hidden, Jobsets: []string{}}
	for _, j := range jobsets {
		out.Jobsets = append(out.Jobsets, j.Name)
	}
	return out
}

type hydraJobsetInput struct {
	Name             string `json:"name"`
	Type             string `json:"type"`
	Value            string `json:"value"`
	EmailResponsible bool   `json:"emailresponsible"`
}

type hydraJobset struct {
	Name                    string                      `json:"name"`
	Project                 string                      `json:"project"`
	Description             *string                     `json:"description"`
	NixExprInput            *string                     `json:"nixexprinput"`
	NixExprPath             *string                     `json:"nixexprpath"`
	ErrorMsg                *string                     `json:"errormsg"`
	ErrorTime               *int64                      `json:"errortime"`
	LastCheckedTime         *int64                      `json:"lastcheckedtime"`
	TriggerTime             *int64                      `json:"triggertime"`
	Enabled                 int32                       `json:"enabled"`
	EnableEmail             bool                        `json:"enableemail"`
	EnableDynamicRunCommand bool                        `json:"enable_dynamic_run_command"`
	Visible                 bool                        `json:"visible"`
	EmailOverride           string                      `json:"emailoverride"`
	KeepNr                  int32                       `json:"keepnr"`
	CheckInterval           int32                       `json:"checkinterval"`
	SchedulingShares        int32                       `json:"schedulingshares"`
	FetchErrorMsg           *string                     `json:"fetcherrormsg"`
	StartTime               *int64                      `json:"starttime"`
	Type                    int32                       `json:"type"`
	Flake                   *string                     `json:"flake"`
	Inputs                  map[string]hydraJobsetInput `json:"inputs"`
}

func nonZero[T comparable](v T) *T {
	var zero T
	if v == zero {
		return nil
	}
	return &v
}

func toHydraJobset(j *pb.Jobset) hydraJobset {
	out := hydraJobset{
		Name: j.Name, Project: j.Project, Description: &j.Description,
		NixExprInput: &j.NixExprInput, NixExprPath: &j.NixExprPath,
		LastCheckedTime: nonZero(j.LastCheckedAt), TriggerTime: nonZero(j.TriggerTime),
		Enabled: j.Enabled, EnableEmail: j.EnableEmail, Visible: !j.Hidden, EmailOverride: j.EmailOverride,
		KeepNr: j.KeepNr, CheckInterval: j.CheckInterval, SchedulingShares: j.SchedulingShares,
		Inputs: map[string]hydraJobsetInput{},
	}
	empty := ""
	out.ErrorMsg, out.FetchErrorMsg = &empty, &empty
	for _, in := range j.Inputs {
		out.Inputs[in.Name] = hydraJobsetInput{Name: in.Name, Type: in.Type, Value: in.Value, EmailResponsible: in.EmailResponsible}
	}
	return out
}

type hydraEvalInput struct {
	URI        *string `json:"uri"`
	Type       string  `json:"type"`
	Revision   *string `json:"revision"`
	Value      *string `json:"value"`
	Dependency *uint64 `json:"dependency"`
}

type hydraEval struct {
	ID           uint64                    `json:"id"`
	Timestamp    int64                     `json:"timestamp"`
	CheckoutTime int64                     `json:"checkouttime"`
	EvalTime     int64                     `json:"evaltime"`
	HasNewBuilds bool                      `json:"hasnewbuilds"`
	Flake        *string                   `json:"flake"`
	Builds       []uint64                  `json:"builds"`
	Inputs       map[string]hydraEvalInput `json:"jobsetevalinputs"`
}

func toHydraEval(e *pb.Eval) hydraEval {
	out := hydraEval{ID: e.Id, Timestamp: e.Timestamp, CheckoutTime: e.CheckoutTime, EvalTime: e.EvalTime,
		HasNewBuilds: e.HasNewBuilds, Flake: nonZero(e.Flake), Builds: e.Builds, Inputs: map[string]hydraEvalInput{}}
	if out.Builds == nil {
		out.Builds = []uint64{}
	}
	for _, name := range slices.Sorted(maps.Keys(e.Inputs)) {
		in := e.Inputs[name]
		out.Inputs[name] = hydraEvalInput{URI: nonZero(in.Uri), Type: in.Type, Revision: nonZero(in.Revision), Value: nonZero(in.Value), Dependency: nonZero(in.Dependency)}
	}
	return out
}

type hydraBuildOutput struct {
	Path string `json:"path"`
}

type hydraBuild struct {
	ID            uint64                      `json:"id"`
	StartTime     *int64                      `json:"starttime"`
	StopTime      *int64                      `json:"stoptime"`
	Timestamp     int64                       `json:"timestamp"`
	JobsetEvals   []uint64                    `json:"jobsetevals"`
	Finished      bool                        `json:"finished"`
	NixName       string                      `json:"nixname"`
	BuildStatus   *int32                      `json:"buildstatus"`
	Jobset        string                      `json:"jobset"`
	Priority      int32                       `json:"priority"`
	Job           string                      `json:"job"`
	DrvPath       string                      `json:"drvpath"`
	System        string                      `json:"system"`
	Project       string                      `json:"project"`
	BuildProducts map[string]any              `json:"buildproducts"`
	BuildOutputs  map[string]hydraBuildOutput `json:"buildoutputs"`
	BuildMetrics  map[string]any              `json:"buildmetrics"`
}

func toHydraBuild(b *pb.Build) hydraBuild {
	out := hydraBuild{ID: b.Id, StartTime: nonZero(b.StartTime), StopTime: nonZero(b.StopTime), Timestamp: b.CreatedAt,
		JobsetEvals: b.EvalIds, Finished: b.State == pb.BuildState_BUILD_STATE_FINISHED, NixName: b.NixName,
		Jobset: b.Jobset, Priority: b.Priority, Job: b.Job, DrvPath: b.DrvPath, System: b.System, Project: b.Project,
		BuildProducts: map[string]any{}, BuildOutputs: map[string]hydraBuildOutput{}, BuildMetrics: map[string]any{}}
	if out.JobsetEvals == nil {
		out.JobsetEvals = []uint64{}
	}
	if out.Finished {
		st := b.BuildStatus
		out.BuildStatus = &st
	}
	for _, o := range b.Outputs {
		out.BuildOutputs[o.Name] = hydraBuildOutput{Path: o.Path}
	}
	if out.Finished && b.BuildStatus == 0 {
		// Hydra lists each output as a "nix-build" product.
		for i, o := range b.Outputs {
			out.BuildProducts[itoa(i+1)] = map[string]any{
				"filesize": nil, "defaultpath": "", "type": "nix-build", "subtype": o.Name,
				"name": raftfsm.NixName(o.Path + ".drv"), "path": o.Path, "sha256hash": nil,
			}
		}
	}
	return out
}

type hydraJobsetOverview struct {
	Name            string  `json:"name"`
	Project         string  `json:"project"`
	NrTotal         int     `json:"nrtotal"`
	CheckInterval   int32   `json:"checkinterval"`
	HasErrorMsg     bool    `json:"haserrormsg"`
	NrScheduled     int     `json:"nrscheduled"`
	NrFailed        int     `json:"nrfailed"`
	ErrorTime       *int64  `json:"errortime"`
	FetchErrorMsg   *string `json:"fetcherrormsg"`
	StartTime       *int64  `json:"starttime"`
	LastCheckedTime *int64  `json:"lastcheckedtime"`
	TriggerTime     *int64  `json:"triggertime"`
}
