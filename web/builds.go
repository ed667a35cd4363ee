package web

import (
	"fmt"
	"net/url"
	"strconv"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// derivationJSON is one node of a submitted derivation graph.
type derivationJSON struct {
	DrvPath          string            `json:"drv_path"`
	Outputs          map[string]string `json:"outputs"`
	InputDrvs        []string          `json:"input_drvs,omitempty"`
	System           string            `json:"system"`
	RequiredFeatures []string          `json:"required_features,omitempty"`
}

type submitJSON struct {
	DrvPath  string           `json:"drv_path"`
	Graph    []derivationJSON `json:"graph"`
	Project  string           `json:"project,omitempty"`
	Jobset   string           `json:"jobset,omitempty"`
	Job      string           `json:"job,omitempty"`
	Priority int32            `json:"priority,omitempty"`
}

type stateChangeJSON struct {
	At     int64  `json:"at"`
	State  string `json:"state"`
	Reason string `json:"reason,omitempty"`
}

// BuildJSON is a build in /api/v1.
type BuildJSON struct {
	ID             uint64            `json:"id"`
	Project        string            `json:"project"`
	Jobset         string            `json:"jobset"`
	Job            string            `json:"job"`
	DrvPath        string            `json:"drv_path"`
	System         string            `json:"system"`
	NixName        string            `json:"nix_name"`
	Priority       int32             `json:"priority"`
	GlobalPriority int64             `json:"global_priority"`
	Finished       bool              `json:"finished"`
	BuildStatus    *int32            `json:"buildstatus"`
	Status         string            `json:"status"`
	CreatedAt      int64             `json:"created_at"`
	StartTime      int64             `json:"start_time,omitempty"`
	StopTime       int64             `json:"stop_time,omitempty"`
	Outputs        map[string]string `json:"outputs"`
	Reason         string            `json:"reason,omitempty"`
	EvalIDs        []uint64          `json:"evaluations"`
	Restarts       uint32            `json:"restarts"`
	StateHistory   []stateChangeJSON `json:"state_history"`
}

func buildJSON(b *pb.Build) BuildJSON {
	out := BuildJSON{
		ID: b.Id, Project: b.Project, Jobset: b.Jobset, Job: b.Job, DrvPath: b.DrvPath, System: b.System,
		NixName: b.NixName, Priority: b.Priority, GlobalPriority: b.GlobalPriority,
		Finished: b.State == pb.BuildState_BUILD_STATE_FINISHED, Status: "queued",
		CreatedAt: b.CreatedAt, StartTime: b.StartTime, StopTime: b.StopTime,
		Outputs: map[string]string{}, Reason: b.Reason, StateHistory: []stateChangeJSON{},
		EvalIDs: b.EvalIds, Restarts: b.Restarts,
	}
	if out.EvalIDs == nil {
		out.EvalIDs = []uint64{}
	}
	if out.Finished {
		st := b.BuildStatus
		out.BuildStatus = &st
		out.Status = statusName(st)
	}
	for _, o := range b.Outputs {
		out.Outputs[o.Name] = o.Path
	}
	for _, h := range b.StateHistory {
		out.StateHistory = append(out.StateHistory, stateChangeJSON{At: h.At, State: h.State, Reason: h.Reason})
	}
	return out
}

// Meta describes a page of a paginated list.
type Meta struct {
	First    string  `json:"first"`
	Last     string  `json:"last"`
	Next     *string `json:"next"`
	Previous *string `json:"previous"`
	Page     int     `json:"page"`
	Pages    int     `json:"pages"`
	PerPage  int     `json:"per_page"`
	Total    int     `json:"total"`
}

const maxPerPage = 1000

// pagination reads page and per_page (defaults 1 and 50).
func pagination(q url.Values) (page, perPage int, err error) {
	page, perPage = 1, 50
	if s := q.Get("page"); s != "" {
		if page, err = strconv.Atoi(s); err != nil || page < 1 || page > 1<<20 {
			return 0, 0, fmt.Errorf("%w: page must be a positive integer", raftfsm.ErrInvalid)
		}
	}
	if s := q.Get("per_page"); s != "" {
		if perPage, err = strconv.Atoi(s); err != nil || perPage < 1 || perPage > maxPerPage {
			return 0, 0, fmt.Errorf("%w: per_page must be 1 to %d", raftfsm.ErrInvalid, maxPerPage)
		}
	}
	return page, perPage, nil
}

func meta(u *url.URL, page, perPage, total int) Meta {
	pages := max((total+perPage-1)/perPage, 1)
	link := func(p int) string {
		q := u.Query()
		q.Del("min_index")
		q.Set("page", strconv.Itoa(p))
		q.Set("per_page", strconv.Itoa(perPage))
		return u.Path + "?" + q.Encode()
	}
	m := Meta{First: link(1), Last: link(pages), Page: page, Pages: pages, PerPage: perPage, Total: total}
	if page < pages {
		s := link(page + 1)
		m.Next = &s
	}
	if page > 1 {
		s := link(min(page-1, pages))
		m.Previous = &s
	}
	return m
}
