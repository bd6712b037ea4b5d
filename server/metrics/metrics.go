// Package metrics exposes a server's activity to Prometheus: requests,
// bytes, errors and latency per export and command, and at scrape time the
// exports' sizes, their connections and the fences.
package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/lvnbd/lvnbd/nbd"
	"github.com/lvnbd/lvnbd/server"
)

// commands are the ones with their own label values; others count as "other".
var commands = []nbd.Command{nbd.CmdRead, nbd.CmdWrite, nbd.CmdFlush, nbd.CmdTrim,
	nbd.CmdCache, nbd.CmdWriteZeroes, nbd.CmdBlockStatus}

func commandLabel(c nbd.Command) string {
	switch c {
	case nbd.CmdRead:
		return "read"
	case nbd.CmdWrite:
		return "write"
	case nbd.CmdFlush:
		return "flush"
	case nbd.CmdTrim:
		return "trim"
	case nbd.CmdCache:
		return "cache"
	case nbd.CmdWriteZeroes:
		return "write_zeroes"
	case nbd.CmdBlockStatus:
		return "block_status"
	}
	return "other"
}

// Metrics is a server.Observer and a Prometheus collector.
type Metrics struct {
	reg      *prometheus.Registry
	requests *prometheus.CounterVec
	errors   *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	latency  *prometheus.HistogramVec
}

// New makes the metrics of a server whose exports are in exports and whose
// fences are in fences (nil when fencing is off).
func New(exports *server.Registry, fences *server.Fences) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lvnbd_requests_total", Help: "NBD requests answered, by export and command.",
		}, []string{"export", "command"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lvnbd_request_errors_total", Help: "NBD requests answered with an error, by export, command and error.",
		}, []string{"export", "command", "error"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lvnbd_request_bytes_total", Help: "Payload bytes of reads and writes, by export and command.",
		}, []string{"export", "command"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "lvnbd_request_duration_seconds",
			Help: "Time from a request being read to its reply being queued, by export and command.",
			// 25 µs to about 6.5 s.
			Buckets: prometheus.ExponentialBuckets(25e-6, 2, 19),
		}, []string{"export", "command"}),
	}
	m.reg.MustRegister(m.requests, m.errors, m.bytes, m.latency,
		&stateCollector{exports: exports, fences: fences},
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return m
}

// exportObserver holds one export's metric handles, looked up once.
type exportObserver struct {
	m        *Metrics
	export   string
	requests map[nbd.Command]prometheus.Counter
	bytes    map[nbd.Command]prometheus.Counter
	latency  map[nbd.Command]prometheus.Observer
}

// ForExport implements server.Observer.
func (m *Metrics) ForExport(name string) server.ExportObserver {
	o := &exportObserver{m: m, export: name, requests: map[nbd.Command]prometheus.Counter{},
		bytes: map[nbd.Command]prometheus.Counter{}, latency: map[nbd.Command]prometheus.Observer{}}
	for _, c := range commands {
		l := commandLabel(c)
		o.requests[c] = m.requests.WithLabelValues(name, l)
		o.bytes[c] = m.bytes.WithLabelValues(name, l)
		o.latency[c] = m.latency.WithLabelValues(name, l)
	}
	return o
}

// Request implements server.ExportObserver.
func (o *exportObserver) Request(cmd nbd.Command, n int, took time.Duration, errno nbd.Errno) {
	req, ok := o.requests[cmd]
	if !ok {
		o.m.requests.WithLabelValues(o.export, "other").Inc()
		if errno != 0 {
			o.m.errors.WithLabelValues(o.export, "other", errno.String()).Inc()
		}
		return
	}
	req.Inc()
	o.latency[cmd].Observe(took.Seconds())
	if errno != 0 {
		o.m.errors.WithLabelValues(o.export, commandLabel(cmd), errno.String()).Inc()
		return
	}
	if cmd == nbd.CmdRead || cmd == nbd.CmdWrite {
		o.bytes[cmd].Add(float64(n))
	}
}

// stateCollector reads the exports and fences at scrape time.
type stateCollector struct {
	exports *server.Registry
	fences  *server.Fences
}

var (
	sizeDesc  = prometheus.NewDesc("lvnbd_export_size_bytes", "Size of each export.", []string{"export", "read_only"}, nil)
	connDesc  = prometheus.NewDesc("lvnbd_connections", "Client connections open to each export.", []string{"export"}, nil)
	fenceDesc = prometheus.NewDesc("lvnbd_fenced_clients", "Clients fenced off this server's exports.", nil, nil)
	failDesc  = prometheus.NewDesc("lvnbd_export_failed",
		"1 when a write-back to the export's storage failed and every request to it fails, also after a restart, until lvnbd recover (lvnbd status says why); also for a failure recorded for an export not served now.",
		[]string{"export"}, nil)
)

func (s *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- sizeDesc
	ch <- connDesc
	ch <- fenceDesc
	ch <- failDesc
}

func (s *stateCollector) Collect(ch chan<- prometheus.Metric) {
	served := map[string]bool{}
	for _, e := range s.exports.Status() {
		served[e.Name] = true
		ch <- prometheus.MustNewConstMetric(sizeDesc, prometheus.GaugeValue, float64(e.Size), e.Name, fmt.Sprint(e.ReadOnly))
		ch <- prometheus.MustNewConstMetric(connDesc, prometheus.GaugeValue, float64(len(e.Clients)), e.Name)
		failed := 0.0
		if e.Failed != "" {
			failed = 1
		}
		ch <- prometheus.MustNewConstMetric(failDesc, prometheus.GaugeValue, failed, e.Name)
	}
	// A failed volume that went missing must not clear an alert. One
	// series per name, though several volumes made under it may each
	// have a record: a repeated one fails the whole scrape.
	if f := s.exports.Failures(); f != nil {
		for _, x := range f.List() {
			if !served[x.Export] {
				served[x.Export] = true
				ch <- prometheus.MustNewConstMetric(failDesc, prometheus.GaugeValue, 1, x.Export)
			}
		}
	}
	if s.fences != nil {
		ch <- prometheus.MustNewConstMetric(fenceDesc, prometheus.GaugeValue, float64(len(s.fences.List())))
	}
}

// Handler serves the metrics in Prometheus's text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// Serve answers /metrics on ln until ctx is done.
func (m *Metrics) Serve(ctx context.Context, ln net.Listener) error {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.Handler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	stop := context.AfterFunc(ctx, func() { srv.Close() })
	defer stop()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("metrics endpoint: %w", err)
	}
	return nil
}
