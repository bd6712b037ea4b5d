package guest

import (
	"fmt"
	"strconv"
	"strings"
)

// Mdstat is the content of /proc/mdstat.
type Mdstat struct {
	Personalities []string // raid1, raid6...
	Arrays        []MdstatArray
	Unused        []string // devices with an md superblock not in any array
}

// MdstatArray is one array's paragraph of /proc/mdstat.
type MdstatArray struct {
	Name string // md127
	// State is the word after the colon: "active", "inactive" (assembled,
	// not started), "broken" (Linux 6.12 on: a RAID1 whose last leg in
	// sync failed; md/array_state tells the same), or another a later
	// kernel may add.
	State    string
	Active   bool   // running: "active" or "broken"
	ReadOnly string // "", "read-only" or "auto-read-only"
	Level    string // raid1; empty for an inactive array
	Members  []MdstatMember
	Blocks   uint64 // size in KiB
	Super    string // metadata version, such as 1.2; empty for 0.90
	// Extra is what the level adds to the size line, such as "512k chunks".
	Extra     string
	RaidDisks int    // slots, the N of [N/M]; 0 when not shown
	Working   int    // in-sync members, the M of [N/M]
	Status    string // one character per slot: U in sync, _ missing or not in sync
	Sync      *MdstatSync
	Bitmap    string // the bitmap line after "bitmap: ", such as "1/1 pages [4KB], 65536KB chunk"
}

// MdstatMember is one component of an array as /proc/mdstat lists it.
type MdstatMember struct {
	Device      string // nbd0
	Role        int    // the number in brackets: the descriptor number, not the slot
	WriteMostly bool   // (W)
	Journal     bool   // (J)
	Faulty      bool   // (F)
	Spare       bool   // (S)
	Replacement bool   // (R)
}

// MdstatSync is a running or waiting resync, recovery, check, repair or
// reshape.
type MdstatSync struct {
	Action string // resync, recovery, check, repair, reshape
	// Pending is DELAYED, PENDING or REMOTE when the action waits; the
	// numbers below are then zero.
	Pending  string
	Permille int    // progress in tenths of a percent
	Done     uint64 // KiB done
	Total    uint64 // KiB to do
	Finish   string // estimated time left, such as 0.6min
	Speed    string // such as 1296K/sec
}

// ParseMdstat reads /proc/mdstat.
func ParseMdstat(b []byte) (Mdstat, error) {
	var st Mdstat
	var cur *MdstatArray
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimRight(line, " \r\t")
		bad := func(why string) error {
			return fmt.Errorf("/proc/mdstat line %d %q: %s: %w", i+1, line, why, errSyntax)
		}
		switch {
		case strings.TrimSpace(line) == "":
			cur = nil
		case strings.HasPrefix(line, "Personalities :"):
			for _, f := range strings.Fields(strings.TrimPrefix(line, "Personalities :")) {
				p, ok := strings.CutPrefix(f, "[")
				if p, ok2 := strings.CutSuffix(p, "]"); ok && ok2 && p != "" {
					st.Personalities = append(st.Personalities, p)
				} else {
					return Mdstat{}, bad("personality not in brackets")
				}
			}
		case strings.HasPrefix(line, "unused devices:"):
			for _, f := range strings.Fields(strings.TrimPrefix(line, "unused devices:")) {
				if f != "<none>" {
					st.Unused = append(st.Unused, f)
				}
			}
		case line[0] != ' ' && line[0] != '\t':
			a, err := parseMdstatHead(line)
			if err != nil {
				return Mdstat{}, bad(err.Error())
			}
			st.Arrays = append(st.Arrays, a)
			cur = &st.Arrays[len(st.Arrays)-1]
		case cur == nil:
			return Mdstat{}, bad("indented line outside an array")
		default:
			if err := cur.parseLine(strings.TrimSpace(line)); err != nil {
				return Mdstat{}, bad(err.Error())
			}
		}
	}
	return st, nil
}

// parseMdstatHead reads "md127 : active raid1 nbd1[1] nbd0[0](F)".
func parseMdstatHead(line string) (MdstatArray, error) {
	name, rest, ok := strings.Cut(line, " : ")
	if !ok || name == "" || strings.ContainsAny(name, " \t") {
		return MdstatArray{}, fmt.Errorf("no NAME : STATE")
	}
	a := MdstatArray{Name: name}
	f := strings.Fields(rest)
	if len(f) == 0 {
		return MdstatArray{}, fmt.Errorf("no state")
	}
	// A state this parser does not know is kept, not refused: one array
	// in a new state must not hide every other from lvnbd guest status
	// and watch. It counts as not running.
	a.State = f[0]
	a.Active = a.State == "active" || a.State == "broken"
	f = f[1:]
	if len(f) > 0 && (f[0] == "(read-only)" || f[0] == "(auto-read-only)") {
		a.ReadOnly = strings.Trim(f[0], "()")
		f = f[1:]
	}
	if a.State != "inactive" && len(f) > 0 && !strings.Contains(f[0], "[") {
		a.Level = f[0]
		f = f[1:]
	}
	for _, m := range f {
		mem, err := parseMdstatMember(m)
		if err != nil {
			return MdstatArray{}, err
		}
		a.Members = append(a.Members, mem)
	}
	return a, nil
}

// parseMdstatMember reads "nbd0[0]" with any of the suffixes (W) (J) (F)
// (S) (R).
func parseMdstatMember(s string) (MdstatMember, error) {
	open := strings.IndexByte(s, '[')
	closing := strings.IndexByte(s, ']')
	if open <= 0 || closing < open {
		return MdstatMember{}, fmt.Errorf("member %q is not NAME[N]", s)
	}
	role, err := strconv.Atoi(s[open+1 : closing])
	if err != nil || role < 0 {
		return MdstatMember{}, fmt.Errorf("member %q: bad number", s)
	}
	m := MdstatMember{Device: s[:open], Role: role}
	for rest := s[closing+1:]; rest != ""; rest = rest[3:] {
		if len(rest) < 3 || rest[0] != '(' || rest[2] != ')' {
			return MdstatMember{}, fmt.Errorf("member %q: bad flags", s)
		}
		switch rest[1] {
		case 'W':
			m.WriteMostly = true
		case 'J':
			m.Journal = true
		case 'F':
			m.Faulty = true
		case 'S':
			m.Spare = true
		case 'R':
			m.Replacement = true
		default:
			return MdstatMember{}, fmt.Errorf("member %q: unknown flag %q", s, rest[1])
		}
	}
	return m, nil
}

// parseLine reads one indented line of an array's paragraph.
func (a *MdstatArray) parseLine(line string) error {
	switch {
	case strings.HasPrefix(line, "bitmap:"):
		a.Bitmap = strings.TrimSpace(strings.TrimPrefix(line, "bitmap:"))
		return nil
	case !a.hasSizeLine() && strings.Contains(line+" ", " blocks "):
		return a.parseSizeLine(line)
	case strings.HasPrefix(line, "[") || strings.Contains(line, "%"):
		return a.parseProgress(line)
	}
	for _, action := range []string{"resync", "recovery", "reshape", "check", "repair"} {
		if state, ok := strings.CutPrefix(line, action+"="); ok {
			a.Sync = &MdstatSync{Action: action, Pending: state}
			return nil
		}
	}
	// Lines of other levels (raid5 journals, cluster state): not ours.
	return nil
}

// parseSizeLine reads "64512 blocks super 1.2 [2/1] [_U]".
func (a *MdstatArray) parseSizeLine(line string) error {
	f := strings.Fields(line)
	n, err := strconv.ParseUint(f[0], 10, 64)
	if err != nil || len(f) < 2 || f[1] != "blocks" {
		return fmt.Errorf("size line does not start with N blocks")
	}
	a.Blocks = n
	f = f[2:]
	if len(f) >= 2 && f[0] == "super" {
		a.Super = f[1]
		f = f[2:]
	}
	var extra []string
	for len(f) > 0 {
		t := f[0]
		f = f[1:]
		if t, ok := strings.CutPrefix(t, "["); ok && strings.HasSuffix(t, "]") {
			t = strings.TrimSuffix(t, "]")
			if n, m, ok := strings.Cut(t, "/"); ok {
				if a.RaidDisks, err = strconv.Atoi(n); err != nil || a.RaidDisks < 0 {
					return fmt.Errorf("bad [N/M]")
				}
				if a.Working, err = strconv.Atoi(m); err != nil || a.Working < 0 {
					return fmt.Errorf("bad [N/M]")
				}
				continue
			}
			if strings.Trim(t, "U_") == "" && t != "" {
				a.Status = t
				continue
			}
		}
		extra = append(extra, t)
	}
	a.Extra = strings.Join(extra, " ")
	return nil
}

// parseProgress reads
// "[===>.................]  recovery = 15.7% (10368/64512) finish=0.6min speed=1296K/sec".
func (a *MdstatArray) parseProgress(line string) error {
	if strings.HasPrefix(line, "[") {
		end := strings.IndexByte(line, ']')
		if end < 0 {
			return fmt.Errorf("progress bar not closed")
		}
		line = strings.TrimSpace(line[end+1:])
	}
	f := strings.Fields(line)
	if len(f) < 4 || f[1] != "=" || !strings.HasSuffix(f[2], "%") {
		return fmt.Errorf("progress is not ACTION = P%% (DONE/TOTAL)")
	}
	s := &MdstatSync{Action: f[0]}
	pct := strings.TrimSuffix(f[2], "%")
	whole, frac, _ := strings.Cut(pct, ".")
	w, err := strconv.Atoi(whole)
	if err != nil || w < 0 || w > 100 || len(frac) > 1 {
		return fmt.Errorf("bad percentage %q", f[2])
	}
	s.Permille = w * 10
	if frac != "" {
		d, err := strconv.Atoi(frac)
		if err != nil || d < 0 {
			return fmt.Errorf("bad percentage %q", f[2])
		}
		s.Permille += d
	}
	counts, ok := strings.CutPrefix(f[3], "(")
	counts, ok2 := strings.CutSuffix(counts, ")")
	done, total, ok3 := strings.Cut(counts, "/")
	if !ok || !ok2 || !ok3 {
		return fmt.Errorf("bad counts %q", f[3])
	}
	if s.Done, err = strconv.ParseUint(done, 10, 64); err != nil {
		return fmt.Errorf("bad counts %q", f[3])
	}
	if s.Total, err = strconv.ParseUint(total, 10, 64); err != nil {
		return fmt.Errorf("bad counts %q", f[3])
	}
	for _, kv := range f[4:] {
		if v, ok := strings.CutPrefix(kv, "finish="); ok {
			s.Finish = v
		} else if v, ok := strings.CutPrefix(kv, "speed="); ok {
			s.Speed = v
		}
	}
	a.Sync = s
	return nil
}

// Format writes st in the layout of /proc/mdstat; ParseMdstat reads it back
// to the same value.
func (st Mdstat) Format() []byte {
	var b strings.Builder
	b.WriteString("Personalities :")
	for _, p := range st.Personalities {
		fmt.Fprintf(&b, " [%s]", p)
	}
	b.WriteString(" \n")
	for _, a := range st.Arrays {
		a.format(&b)
		b.WriteString("\n")
	}
	b.WriteString("unused devices: ")
	if len(st.Unused) == 0 {
		b.WriteString("<none>")
	}
	b.WriteString(strings.Join(st.Unused, " "))
	b.WriteString("\n")
	return []byte(b.String())
}

func (a MdstatArray) format(b *strings.Builder) {
	fmt.Fprintf(b, "%s : ", a.Name)
	switch {
	case a.State != "":
		b.WriteString(a.State)
	case a.Active:
		b.WriteString("active")
	default:
		b.WriteString("inactive")
	}
	if a.ReadOnly != "" {
		fmt.Fprintf(b, " (%s)", a.ReadOnly)
	}
	if a.Level != "" {
		fmt.Fprintf(b, " %s", a.Level)
	}
	for _, m := range a.Members {
		fmt.Fprintf(b, " %s[%d]", m.Device, m.Role)
		for _, f := range []struct {
			on bool
			c  string
		}{{m.WriteMostly, "W"}, {m.Journal, "J"}, {m.Faulty, "F"}, {m.Spare, "S"}, {m.Replacement, "R"}} {
			if f.on {
				fmt.Fprintf(b, "(%s)", f.c)
			}
		}
	}
	b.WriteString("\n")
	if a.hasSizeLine() {
		fmt.Fprintf(b, "      %d blocks", a.Blocks)
		if a.Super != "" {
			fmt.Fprintf(b, " super %s", a.Super)
		}
		if a.Extra != "" {
			fmt.Fprintf(b, " %s", a.Extra)
		}
		if a.RaidDisks != 0 || a.Working != 0 {
			fmt.Fprintf(b, " [%d/%d]", a.RaidDisks, a.Working)
		}
		if a.Status != "" {
			fmt.Fprintf(b, " [%s]", a.Status)
		}
		b.WriteString("\n")
	}
	if s := a.Sync; s != nil {
		if s.Pending != "" {
			fmt.Fprintf(b, "      \t%s=%s\n", s.Action, s.Pending)
		} else {
			bar := min(max(s.Permille*20/1000, 0), 20)
			fmt.Fprintf(b, "      [%s>%s]  %s = %d.%d%% (%d/%d) finish=%s speed=%s\n",
				strings.Repeat("=", bar), strings.Repeat(".", 20-bar), s.Action,
				s.Permille/10, s.Permille%10, s.Done, s.Total, s.Finish, s.Speed)
		}
	}
	if a.Bitmap != "" {
		fmt.Fprintf(b, "      bitmap: %s\n", a.Bitmap)
	}
}

// hasSizeLine reports whether the size line ("N blocks ...") was read.
func (a *MdstatArray) hasSizeLine() bool {
	return a.Blocks != 0 || a.Super != "" || a.Extra != "" || a.RaidDisks != 0 || a.Working != 0 || a.Status != ""
}
