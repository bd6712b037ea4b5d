package pair

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestCollector(t *testing.T) {
	status := []PairStatus{{Name: "vm1", Up: true, Legs: []LegStatus{
		{Leg: "a", State: StateConnected, Size: 1 << 30, Reconnects: 2},
		{Leg: "b", State: StateReconnecting, Size: 1 << 30},
	}}}
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector(func() []PairStatus { return status }))
	want := `
# HELP lvnbd_pair_leg_reconnects_total Fresh sets of connections given to each leg's device since the daemon started.
# TYPE lvnbd_pair_leg_reconnects_total counter
lvnbd_pair_leg_reconnects_total{leg="a",pair="vm1"} 2
lvnbd_pair_leg_reconnects_total{leg="b",pair="vm1"} 0
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "lvnbd_pair_leg_reconnects_total"); err != nil {
		t.Error(err)
	}
	n, err := testutil.GatherAndCount(reg, "lvnbd_pair_leg_state")
	if err != nil || n != 10 {
		t.Errorf("leg state series: %d, %v (want 5 states × 2 legs)", n, err)
	}
	got, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range got {
		if mf.GetName() != "lvnbd_pair_leg_state" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			on := m.GetGauge().GetValue() == 1
			wantOn := (labels["leg"] == "a" && labels["state"] == "connected") || (labels["leg"] == "b" && labels["state"] == "reconnecting")
			if on != wantOn {
				t.Errorf("%v = %v", labels, m.GetGauge().GetValue())
			}
		}
	}
	// Nothing to report while the daemon starts.
	empty := prometheus.NewRegistry()
	empty.MustRegister(NewCollector(func() []PairStatus { return nil }))
	if n, _ := testutil.GatherAndCount(empty); n != 0 {
		t.Errorf("%d series with no pairs", n)
	}
}
