package main

import (
	"bytes"
	"strings"
	"testing"
)

func TestCompletion(t *testing.T) {
	tests := []struct {
		shell string
		want  []string
	}{
		{"bash", []string{"# bash completion V2 for lvnbd", "__start_lvnbd", "complete -o default -F __start_lvnbd lvnbd"}},
		{"zsh", []string{"#compdef lvnbd", "_lvnbd"}},
		{"fish", []string{"complete -c lvnbd", "__lvnbd_perform_completion"}},
	}
	for _, tt := range tests {
		t.Run(tt.shell, func(t *testing.T) {
			var out, errOut bytes.Buffer
			root := newRootCmd(&out, &errOut)
			root.SetArgs([]string{"completion", tt.shell})
			if err := root.Execute(); err != nil {
				t.Fatalf("%v\n%s", err, errOut.String())
			}
			for _, w := range tt.want {
				if !strings.Contains(out.String(), w) {
					t.Errorf("the %s script has no %q", tt.shell, w)
				}
			}
		})
	}
}

// TestCompletionCompletesCommands asks the completion back end what bash
// would offer after "lvnbd se", as the generated scripts do.
func TestCompletionCompletesCommands(t *testing.T) {
	var out, errOut bytes.Buffer
	root := newRootCmd(&out, &errOut)
	root.SetArgs([]string{"__complete", "se"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "serve\t") {
		t.Errorf("completing %q does not offer serve:\n%s", "se", out.String())
	}
	out.Reset()
	root = newRootCmd(&out, &errOut)
	root.SetArgs([]string{"__complete", "serve", "--lis"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "--listen") {
		t.Errorf("completing serve --lis does not offer --listen:\n%s", out.String())
	}
}

func TestCompletionRefusesOtherShells(t *testing.T) {
	for _, args := range [][]string{{"completion", "powershell"}, {"completion"}, {"completion", "bash", "zsh"}} {
		var out, errOut bytes.Buffer
		root := newRootCmd(&out, &errOut)
		root.SetArgs(args)
		if err := root.Execute(); err == nil {
			t.Errorf("lvnbd %s succeeded", strings.Join(args, " "))
		}
	}
}

// TestOneCompletionCommand: cobra adds its default completion command at
// Execute unless one exists; ours must be the only one.
func TestOneCompletionCommand(t *testing.T) {
	var out, errOut bytes.Buffer
	root := newRootCmd(&out, &errOut)
	root.SetArgs([]string{"--help"})
	if err := root.Execute(); err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, c := range root.Commands() {
		if c.Name() == "completion" {
			n++
			if !strings.Contains(c.Long, "/usr/share/bash-completion/completions/lvnbd") {
				t.Errorf("the completion command is not ours: %q", c.Short)
			}
		}
	}
	if n != 1 {
		t.Errorf("%d completion commands, want 1", n)
	}
}
