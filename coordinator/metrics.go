package coordinator

import (
	"net/http"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/kilnci/kiln/raftfsm"
	pb "github.com/kilnci/kiln/raftfsm/fsmpb"
)

// metrics are this node's Prometheus metrics, in a registry of its own
// (several coordinators may share a process in tests).
type metrics struct {
	reg *prometheus.Registry

	leasesGranted  prometheus.Counter
	leasesExpired  prometheus.Counter
	stepDuration   prometheus.Histogram
	submitToLease  prometheus.Histogram
	narBytesIn     prometheus.Counter
	narBytesOut    prometheus.Counter
	commitDuration prometheus.Histogram
	cacheRequests  *prometheus.CounterVec
	cacheCounters  map[cacheKind]prometheus.Counter
	blobCopies     *prometheus.CounterVec
}

func newMetrics(c *Coordinator) *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.leasesGranted = prometheus.NewCounter(prometheus.CounterOpts{Name: "kiln_leases_granted_total", Help: "Leases granted by this node while it led."})
	m.leasesExpired = prometheus.NewCounter(prometheus.CounterOpts{Name: "kiln_leases_expired_total", Help: "Leases expired by this node for want of heartbeats while it led."})
	m.stepDuration = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "kiln_step_duration_seconds", Help: "Time from lease grant to completion of steps completed on this leader.",
		Buckets: prometheus.ExponentialBuckets(1, 2, 16)})
	m.submitToLease = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "kiln_submit_to_lease_seconds", Help: "Time from a step's creation to its lease grant.",
		Buckets: prometheus.ExponentialBuckets(0.001, 4, 12)})
	m.narBytesIn = prometheus.NewCounter(prometheus.CounterOpts{Name: "kiln_nar_bytes_in_total", Help: "Compressed NAR bytes accepted by uploads to this node."})
	m.narBytesOut = prometheus.NewCounter(prometheus.CounterOpts{Name: "kiln_nar_bytes_out_total", Help: "Compressed NAR bytes served by this node's cache."})
	m.commitDuration = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "kiln_raft_commit_seconds", Help: "Time from proposing a Raft entry to its being applied on the leader.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)})
	m.cacheRequests = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_cache_requests_total", Help: "Binary cache GET/HEAD requests by kind and result (hit or miss)."},
		[]string{"kind", "result"})
	m.cacheCounters = map[cacheKind]prometheus.Counter{}
	for _, kind := range []string{"narinfo", "nar", "log"} {
		m.cacheCounters[cacheKind{kind, true}] = m.cacheRequests.WithLabelValues(kind, "hit")
		m.cacheCounters[cacheKind{kind, false}] = m.cacheRequests.WithLabelValues(kind, "miss")
	}
	m.blobCopies = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "kiln_blob_copies_total",
		Help: "Blob copies this node sent to other coordinators: streamed while an upload arrived, or pushed after; by result."}, []string{"how", "result"})
	for _, how := range []string{"streamed", "pushed"} {
		for _, result := range []string{"ok", "failed"} {
			m.blobCopies.WithLabelValues(how, result)
		}
	}
	m.reg.MustRegister(m.leasesGranted, m.leasesExpired, m.stepDuration, m.submitToLease, m.narBytesIn, m.narBytesOut, m.commitDuration, m.cacheRequests, m.blobCopies,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), stateCollector{c})
	return m
}

// countBlobCopy counts one blob copy sent to a peer ("streamed" or
// "pushed") by its result.
func (m *metrics) countBlobCopy(how string, err error) {
	result := "ok"
	if err != nil {
		result = "failed"
	}
	m.blobCopies.WithLabelValues(how, result).Inc()
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg, MaxRequestsInFlight: 4, Timeout: 30 * time.Second})
}

// stateCollector reads gauges from the replica and Raft at scrape time.
type stateCollector struct{ c *Coordinator }

var (
	descQueue     = prometheus.NewDesc("kiln_queue_steps", "Steps waiting or runnable, by system and state.", []string{"system", "state"}, nil)
	descRunning   = prometheus.NewDesc("kiln_running_steps", "Steps leased to an agent.", nil, nil)
	descBuilds    = prometheus.NewDesc("kiln_builds", "Builds in this replica by Hydra status (queued builds have status \"queued\").", []string{"status"}, nil)
	descRaftState = prometheus.NewDesc("kiln_raft_state", "1 for this node's current Raft state.", []string{"state"}, nil)
	descApplied   = prometheus.NewDesc("kiln_raft_applied_index", "Last Raft index applied on this node.", nil, nil)
	descCommit    = prometheus.NewDesc("kiln_raft_commit_index", "Last Raft index known committed on this node.", nil, nil)
	descAgents    = prometheus.NewDesc("kiln_agents_connected", "Agents that called the leader in the last minute (0 on followers).", nil, nil)
	descNarInfos  = prometheus.NewDesc("kiln_cache_records", "Narinfo and build log records in the binary cache.", nil, nil)
)

func (s stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descQueue, descRunning, descBuilds, descRaftState, descApplied, descCommit, descAgents, descNarInfos} {
		ch <- d
	}
}

func (s stateCollector) Collect(ch chan<- prometheus.Metric) {
	c := s.c
	r := c.fsm.Read()
	queue := map[[2]string]int{}
	for _, st := range []pb.StepState{pb.StepState_STEP_STATE_WAITING, pb.StepState_STEP_STATE_RUNNABLE} {
		if each, err := r.StepsIn(nil, st); err == nil {
			name := map[pb.StepState]string{pb.StepState_STEP_STATE_WAITING: "waiting", pb.StepState_STEP_STATE_RUNNABLE: "runnable"}[st]
			each(func(step raftfsm.StepRef) bool { queue[[2]string{step.System(), name}]++; return true })
		}
	}
	for k, n := range queue {
		ch <- prometheus.MustNewConstMetric(descQueue, prometheus.GaugeValue, float64(n), k[0], k[1])
	}
	if leases, err := r.Leases(); err == nil {
		ch <- prometheus.MustNewConstMetric(descRunning, prometheus.GaugeValue, float64(len(leases)))
	}
	builds := map[string]int{}
	_ = r.EachBuildNewestFirst(func(b *pb.Build) bool {
		status := "queued"
		if b.State == pb.BuildState_BUILD_STATE_FINISHED {
			status = raftfsm.BuildStatusName(b.BuildStatus)
		}
		builds[status]++
		return true
	})
	for st, n := range builds {
		ch <- prometheus.MustNewConstMetric(descBuilds, prometheus.GaugeValue, float64(n), st)
	}
	state := c.raft.State()
	for _, st := range []raft.RaftState{raft.Follower, raft.Candidate, raft.Leader, raft.Shutdown} {
		v := 0.0
		if st == state {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(descRaftState, prometheus.GaugeValue, v, st.String())
	}
	ch <- prometheus.MustNewConstMetric(descApplied, prometheus.GaugeValue, float64(c.fsm.AppliedIndex()))
	ch <- prometheus.MustNewConstMetric(descCommit, prometheus.GaugeValue, float64(c.raft.CommitIndex()))
	agents := 0
	if live := c.live(); live != nil {
		live.mu.Lock()
		for _, seen := range live.agents {
			if time.Since(seen) < time.Minute {
				agents++
			}
		}
		live.mu.Unlock()
	}
	ch <- prometheus.MustNewConstMetric(descAgents, prometheus.GaugeValue, float64(agents))
	paths := 0
	_ = r.EachBlob(nil, func(string) bool { paths++; return true })
	ch <- prometheus.MustNewConstMetric(descNarInfos, prometheus.GaugeValue, float64(paths))
}

// Request counts a cache GET/HEAD (cache.Metrics).
func (m *metrics) Request(kind string, hit bool) {
	if c, ok := m.cacheCounters[cacheKind{kind, hit}]; ok {
		c.Inc() // the common kinds, looked up once
		return
	}
	result := "miss"
	if hit {
		result = "hit"
	}
	m.cacheRequests.WithLabelValues(kind, result).Inc()
}

type cacheKind struct {
	kind string
	hit  bool
}

// Uploaded counts NAR bytes accepted (cache.Metrics).
func (m *metrics) Uploaded(n int64) { m.narBytesIn.Add(float64(n)) }

// Served counts NAR bytes sent (cache.Metrics).
func (m *metrics) Served(n int64) { m.narBytesOut.Add(float64(n)) }
