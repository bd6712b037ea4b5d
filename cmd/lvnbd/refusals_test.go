package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/lvnbd/lvnbd/client/pair"
	"github.com/lvnbd/lvnbd/client/refusals"
)

func TestPairRefusals(t *testing.T) {
	dir := t.TempDir()
	store := refusals.Open(filepath.Join(dir, "refused-legs.json"))
	since := time.Date(2026, 12, 7, 5, 37, 58, 0, time.UTC)
	for backend, r := range map[string]refusals.Refusal{
		"nbd://boxa:10809/vm1": {Pair: "vm1", Leg: "a", Reason: "rolled back", Since: since, Accepts: "u1"},
		"nbd://boxb:10809/vm1": {Pair: "vm1", Leg: "b", Reason: "shrank", Since: since},
		"nbd://boxa:10809/vm2": {Pair: "vm2", Leg: "a", Reason: "box went down", Since: since, Accepts: "u2"},
		"nbd://boxa:10809/vm9": {Pair: "vm9", Leg: "a", Reason: "made anew", Since: since, Accepts: "u9"},
	} {
		if err := store.Add(backend, r); err != nil {
			t.Fatal(err)
		}
	}
	host := &hostDeps{refusals: store, clientConfig: filepath.Join(dir, "client.toml"),
		pairs: legsOf("nbd://boxb:10809/vm1")} // the daemon runs vm1; client.toml has vm2, not running
	if err := os.WriteFile(host.clientConfig, []byte("[[pair]]\nname = \"vm2\"\na = \"nbd://boxa/vm2\"\nb = \"nbd://boxb/vm2\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) (string, error) {
		t.Helper()
		out, _, err := runCmd(t, newPairRefusalsCmd(host, nil), args...)
		return out, err
	}

	out, err := run()
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range []string{
		"PAIR  LEG  EXPORT                SINCE                 LIFTED BY",
		"vm1   a    nbd://boxa:10809/vm1  2026-12-07T05:37:58Z  volume u1 served again",
		"vm1   b    nbd://boxb:10809/vm1  2026-12-07T05:37:58Z  nothing (replace the leg)",
		"vm2   a    nbd://boxa:10809/vm2  2026-12-07T05:37:58Z  volume u2 served again",
		"vm9   a    nbd://boxa:10809/vm9  2026-12-07T05:37:58Z  volume u9 served again",
		"vm1 leg b: shrank",
	} {
		if !strings.Contains(out, line+"\n") {
			t.Errorf("lvnbd pair refusals lacks %q:\n%s", line, out)
		}
	}
	out, err = run("--json")
	if err != nil {
		t.Fatal(err)
	}
	var rows []refusalRow
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("--json: %v\n%s", err, out)
	}
	if diff := cmp.Diff([]refusalRow{
		{Export: "nbd://boxa:10809/vm1", Pair: "vm1", Leg: "a", Since: since, Accepts: "u1", Reason: "rolled back"},
		{Export: "nbd://boxb:10809/vm1", Pair: "vm1", Leg: "b", Since: since, Reason: "shrank"},
		{Export: "nbd://boxa:10809/vm2", Pair: "vm2", Leg: "a", Since: since, Accepts: "u2", Reason: "box went down"},
		{Export: "nbd://boxa:10809/vm9", Pair: "vm9", Leg: "a", Since: since, Accepts: "u9", Reason: "made anew"},
	}, rows); diff != "" {
		t.Errorf("--json (-want +got):\n%s", diff)
	}

	refused := []struct{ uri, want string }{
		{"nbd://boxb/vm1", "nbd://boxb/vm1 is leg b of pair vm1 (lvnbd client): its refusal goes when the leg is replaced"},
		{"nbd://boxa/vm2", "nbd://boxa/vm2 is leg a of pair vm2 in " + host.clientConfig + ": its refusal goes when the leg is replaced"},
		{"nbd://boxc/vm1", "no refusal is recorded for nbd://boxc/vm1 (lvnbd pair refusals lists them)"},
		{"boxa/vm9", `invalid NBD URI "boxa/vm9"`},
	}
	for _, tt := range refused {
		if _, err := run("--forget", tt.uri); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("--forget %s: %v, want %q", tt.uri, err, tt.want)
		}
	}
	// Nothing is forgotten while a pair's legs cannot be told.
	hung := *host
	hung.pairs = func(context.Context) ([]pair.PairStatus, error) { return nil, context.DeadlineExceeded }
	if _, _, err := runCmd(t, newPairRefusalsCmd(&hung, nil), "--forget", "nbd://boxa/vm9"); err == nil ||
		!strings.Contains(err.Error(), "cannot tell whether nbd://boxa:10809/vm9 is a pair's leg (context deadline exceeded): not forgetting its refusal") {
		t.Errorf("--forget with the daemon not answering: %v", err)
	}
	broken := *host
	broken.clientConfig = filepath.Join(dir, "broken.toml")
	if err := os.WriteFile(broken.clientConfig, []byte("[[pair]]\nname = 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := runCmd(t, newPairRefusalsCmd(&broken, nil), "--forget", "nbd://boxa/vm9"); err == nil ||
		!strings.Contains(err.Error(), "not forgetting its refusal; fix "+broken.clientConfig+" first") {
		t.Errorf("--forget with client.toml unreadable: %v", err)
	}
	if _, err := run("--forget", "nbd://boxa/vm9", "--json"); err == nil {
		t.Error("--forget with --json: no error")
	}
	if all, _ := store.All(); len(all) != 4 {
		t.Fatalf("refusals after refused --forgets: %v", all)
	}

	// vm9 was removed for good: forgotten, however its export is spelt.
	out, err = run("--forget", "nbd://BoxA.:10809/vm9")
	if err != nil || !strings.Contains(out, "forgot the refusal of nbd://BoxA.:10809/vm9 (leg a of pair vm9, since 2026-12-07T05:37:58Z)") {
		t.Fatalf("--forget of vm9's export: %v\n%s", err, out)
	}
	all, err := store.All()
	if _, left := all["nbd://boxa:10809/vm9"]; err != nil || len(all) != 3 || left {
		t.Errorf("refusals after forgetting vm9's: %v, %v; want vm1's and vm2's only", all, err)
	}

	empty := &hostDeps{refusals: refusals.Open(filepath.Join(dir, "none.json"))}
	if out, _, err := runCmd(t, newPairRefusalsCmd(empty, nil)); err != nil || out != "no leg refused\n" {
		t.Errorf("no refusals: %q, %v", out, err)
	}
}
