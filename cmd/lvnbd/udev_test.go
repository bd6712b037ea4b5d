package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestUdevRuleMissing(t *testing.T) {
	for _, tc := range []struct {
		name  string
		files []string // under the fake root; "->" makes a symlink
		want  bool
	}{
		{name: "no udevd", files: nil, want: false},
		{name: "udevd without the rule", files: []string{"/run/udev/control", "/lib/udev/rules.d/60-persistent-storage.rules"}, want: true},
		{name: "packaged", files: []string{"/run/udev/control", "/lib/udev/rules.d/59-lvnbd.rules"}, want: false},
		{name: "usr-merged path", files: []string{"/run/udev/control", "/usr/lib/udev/rules.d/59-lvnbd.rules"}, want: false},
		{name: "by hand", files: []string{"/run/udev/control", "/etc/udev/rules.d/59-lvnbd.rules"}, want: false},
		{name: "masked", files: []string{"/run/udev/control", "/etc/udev/rules.d/59-lvnbd.rules->/dev/null"}, want: false},
		{name: "another name", files: []string{"/run/udev/control", "/etc/udev/rules.d/60-lvnbd.rules"}, want: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			for _, f := range tc.files {
				path, target, link := strings.Cut(f, "->")
				p := filepath.Join(root, path)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				var err error
				if link {
					err = os.Symlink(target, p)
				} else {
					err = os.WriteFile(p, nil, 0o644)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			if got := udevRuleMissing(root); got != tc.want {
				t.Errorf("udevRuleMissing = %v, want %v", got, tc.want)
			}
		})
	}
}
