package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/lvnbd/lvnbd/config"
)

func TestManPages(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "man1")
	t.Setenv("SOURCE_DATE_EPOCH", "1700000000")
	var out, errOut bytes.Buffer
	root := newRootCmd(&out, &errOut)
	root.SetArgs([]string{"man", dir})
	if err := root.Execute(); err != nil {
		t.Fatalf("%v\n%s", err, errOut.String())
	}

	// A page for every command a user can run, named as man expects.
	var want []string
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if !c.IsAvailableCommand() && c != root {
			return
		}
		want = append(want, strings.ReplaceAll(c.CommandPath(), " ", "-")+".1")
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	for _, name := range []string{"lvnbd.1", "lvnbd-serve.1", "lvnbd-volume-create.1", "lvnbd-completion.1", "lvnbd-man.1"} {
		if !contains(want, name) {
			t.Errorf("no command for %s", name)
		}
	}
	for _, name := range want {
		if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
			t.Errorf("no man page for %s: %v", name, err)
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !contains(want, e.Name()) {
			t.Errorf("unexpected page %s (a hidden or help command?)", e.Name())
		}
	}
	if said := fmt.Sprintf("wrote %d man pages to %s\n", len(want), dir); out.String() != said {
		t.Errorf("man printed %q, want %q", out.String(), said)
	}

	serve, err := os.ReadFile(filepath.Join(dir, "lvnbd-serve.1"))
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{`.TH "LVNBD-SERVE" "1" "Nov 2023" "lvnbd ` + version + `" "lvnbd manual"`, `\fB--listen\fP`, ".SH SEE ALSO"} {
		if !strings.Contains(string(serve), w) {
			t.Errorf("lvnbd-serve.1 has no %q", w)
		}
	}
	if strings.Contains(string(serve), "Auto generated") {
		t.Error("lvnbd-serve.1 has cobra's auto-generated tag")
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// TestServeDefaultsMatchConfig: the defaults lvnbd-serve(1) shows for the
// flags are those of /etc/lvnbd/server.toml (config.Default), so that a key
// left out of the file and a flag left off the command line mean the same.
func TestServeDefaultsMatchConfig(t *testing.T) {
	fs := newServeCmd().Flags()
	fs.VisitAll(func(f *pflag.Flag) { f.Changed = true }) // every flag at its default, as if given
	got := config.Default()
	if err := got.ApplyFlags(fs); err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(config.Default(), got, cmpopts.EquateEmpty()); d != "" {
		t.Errorf("serve's flag defaults differ from config.Default() (-config +flags)\n%s", d)
	}
}
