package pair

import (
	"github.com/prometheus/client_golang/prometheus"
)

var (
	legStateDesc = prometheus.NewDesc("lvnbd_pair_leg_state",
		"1 for the state each leg is in (attaching, connected, reconnecting, failed, down), 0 for the others.",
		[]string{"pair", "leg", "state"}, nil)
	legReconnectsDesc = prometheus.NewDesc("lvnbd_pair_leg_reconnects_total",
		"Fresh sets of connections given to each leg's device since the daemon started.",
		[]string{"pair", "leg"}, nil)
	legSizeDesc = prometheus.NewDesc("lvnbd_pair_leg_size_bytes", "Size of each leg's device.", []string{"pair", "leg"}, nil)
	pairUpDesc  = prometheus.NewDesc("lvnbd_pair_up", "1 unless the pair, or one of its legs, was taken down with lvnbd pair down.", []string{"pair"}, nil)
)

var allStates = []State{StateAttaching, StateConnected, StateReconnecting, StateFailed, StateDown}

// collector reads the legs' states at scrape time.
type collector struct{ status func() []PairStatus }

// NewCollector exports to Prometheus the pairs that status returns (it may
// return nil while the daemon starts or reloads).
func NewCollector(status func() []PairStatus) prometheus.Collector { return collector{status} }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- legStateDesc
	ch <- legReconnectsDesc
	ch <- legSizeDesc
	ch <- pairUpDesc
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	for _, p := range c.status() {
		up := 0.0
		if p.Up {
			up = 1
		}
		ch <- prometheus.MustNewConstMetric(pairUpDesc, prometheus.GaugeValue, up, p.Name)
		for _, l := range p.Legs {
			for _, s := range allStates {
				v := 0.0
				if l.State == s {
					v = 1
				}
				ch <- prometheus.MustNewConstMetric(legStateDesc, prometheus.GaugeValue, v, p.Name, l.Leg, string(s))
			}
			ch <- prometheus.MustNewConstMetric(legReconnectsDesc, prometheus.CounterValue, float64(l.Reconnects), p.Name, l.Leg)
			ch <- prometheus.MustNewConstMetric(legSizeDesc, prometheus.GaugeValue, float64(l.Size), p.Name, l.Leg)
		}
	}
}
