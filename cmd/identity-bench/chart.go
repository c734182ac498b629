package main

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"image/color"
	"io"
	"io/fs"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/text"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"

	"github.com/identityd/identityd/internal/atomicfile"
)

// chartCmd draws SVG charts from results already written: it reads files
// and writes files, nothing else, so it needs neither root nor the world.
type chartCmd struct {
	Out   string   `required:"" type:"path" help:"Directory to write the SVG charts to (made if missing)."`
	Files []string `arg:"" type:"path" help:"identity-bench results (--json-out) and bench/spire.sh results.jsonl files, or directories holding them (*.json and *.jsonl, recursively)."`
}

func (c *chartCmd) Run() error {
	written, err := makeCharts(c.Out, c.Files, os.Stderr)
	for _, f := range written {
		fmt.Println(f)
	}
	return err
}

// spireRun is one line of bench/spire.sh's results.jsonl: one system, one
// audience mode, K clients, one round.
type spireRun struct {
	System     string  `json:"system"`
	Mode       string  `json:"mode"`
	Clients    int     `json:"clients"`
	Throughput float64 `json:"throughput"`
	P99        float64 `json:"p99_ms"`
	Alg        string  `json:"alg"`
	Round      int     `json:"round"`
}

// inputs is everything read: identity-bench results and spire.sh lines.
type inputs struct {
	results []namedResult
	spire   []spireRun
}

type namedResult struct {
	path string
	res  result
}

// readInputs reads every file named, and every *.json and *.jsonl under
// the directories named. What it cannot read or make sense of is reported
// on warn and skipped.
func readInputs(paths []string, warn io.Writer) inputs {
	var in inputs
	for _, p := range paths {
		st, err := os.Stat(p)
		if err != nil {
			fmt.Fprintf(warn, "identity-bench chart: skip %s: %v\n", p, err)
			continue
		}
		if !st.IsDir() {
			in.readFile(p, warn)
			continue
		}
		err = filepath.WalkDir(p, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				fmt.Fprintf(warn, "identity-bench chart: skip %s: %v\n", path, err)
				return nil
			}
			if d.Type().IsRegular() && (strings.HasSuffix(path, ".json") || strings.HasSuffix(path, ".jsonl")) {
				in.readFile(path, warn)
			}
			return nil
		})
		if err != nil {
			fmt.Fprintf(warn, "identity-bench chart: walk %s: %v\n", p, err)
		}
	}
	return in
}

func (in *inputs) readFile(path string, warn io.Writer) {
	b, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintf(warn, "identity-bench chart: skip %s: %v\n", path, err)
		return
	}
	// A result is one JSON document with a configuration and something
	// measured; a JSON lines file also decodes as one document when it has
	// a single line, so the shape decides, not the decoder.
	var r result
	if json.Unmarshal(b, &r) == nil && r.Config.Alg != "" && (len(r.Summaries) > 0 || r.Storm != nil) {
		in.results = append(in.results, namedResult{path, r})
		return
	}
	var runs []spireRun
	bad := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(nil, 1<<20)
	for line := 1; sc.Scan(); line++ {
		t := bytes.TrimSpace(sc.Bytes())
		if len(t) == 0 {
			continue
		}
		var s spireRun
		if err := json.Unmarshal(t, &s); err != nil || s.System == "" || s.Mode == "" || s.Alg == "" || s.Clients < 1 {
			bad++
			if len(runs) > 0 || bad > 1 {
				fmt.Fprintf(warn, "identity-bench chart: %s:%d: not a spire.sh result line, skipped\n", path, line)
			}
			continue
		}
		runs = append(runs, s)
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintf(warn, "identity-bench chart: read %s: %v\n", path, err)
	}
	if len(runs) == 0 {
		fmt.Fprintf(warn, "identity-bench chart: skip %s: neither an identity-bench result with summaries or a storm, nor bench/spire.sh result lines\n", path)
		return
	}
	in.spire = append(in.spire, runs...)
}

// series is one line of a chart: at each x, the min, median and max of
// every input that gave a figure there.
type series struct {
	name  string
	style int // index into seriesStyles
	at    map[float64][][3]float64
}

func (s *series) add(x float64, v [3]float64) {
	if s.at == nil {
		s.at = map[float64][][3]float64{}
	}
	s.at[x] = append(s.at[x], v)
}

// point is a series at one x. Several inputs at the same x (the same
// configuration run twice) combine into one point: the least minimum, the
// median of the medians, the greatest maximum.
func (s *series) point(x float64) [3]float64 { return combine(s.at[x]) }

func combine(vs [][3]float64) [3]float64 {
	mins, meds, maxs := make([]float64, len(vs)), make([]float64, len(vs)), make([]float64, len(vs))
	for i, v := range vs {
		mins[i], meds[i], maxs[i] = v[0], v[1], v[2]
	}
	return [3]float64{slices.Min(mins), med(meds), slices.Max(maxs)}
}

func (s *series) xs() []float64 {
	xs := make([]float64, 0, len(s.at))
	for x := range s.at {
		xs = append(xs, x)
	}
	slices.Sort(xs)
	return xs
}

// hline is a horizontal reference line (a floor that does not depend on x).
type hline struct {
	name  string
	style int
	y     float64
}

// figure is one chart, as data: drawing it is draw's business.
type figure struct {
	file           string
	title          string
	xLabel, yLabel string
	series         []*series
	hlines         []hline
}

func (f *figure) line(name string, style int) *series {
	for _, s := range f.series {
		if s.name == name {
			return s
		}
	}
	s := &series{name: name, style: style}
	f.series = append(f.series, s)
	return s
}

// The styles of the lines: colour-blind-safe colours, and shapes so that a
// grey print still tells them apart.
var seriesStyles = []struct {
	color  color.RGBA
	glyph  draw.GlyphDrawer
	dashed bool
}{
	{color.RGBA{0, 114, 178, 255}, draw.CircleGlyph{}, false},     // identityd
	{color.RGBA{230, 159, 0, 255}, draw.SquareGlyph{}, false},     // baseline
	{color.RGBA{110, 110, 110, 255}, draw.TriangleGlyph{}, false}, // bare HTTP
	{color.RGBA{213, 94, 0, 255}, draw.PyramidGlyph{}, false},     // SPIRE
	{color.RGBA{86, 180, 233, 255}, draw.RingGlyph{}, false},      // median sandbox, others
	{color.RGBA{0, 158, 115, 255}, draw.CrossGlyph{}, true},       // floors
	{color.RGBA{204, 121, 167, 255}, draw.PlusGlyph{}, true},      // floors with the clients' cost
	{color.RGBA{0, 114, 178, 255}, draw.BoxGlyph{}, true},         // floors at the measured all-cores rate
}

const (
	styleIdentityd = iota
	styleBaseline
	styleHTTP
	styleSPIRE
	styleMedian
	styleFloor
	styleFloorWithClients
	styleFloorMeasured
)

var targetNames = map[string]struct {
	name  string
	style int
}{
	"identityd": {"identityd", styleIdentityd},
	"baseline":  {"baseline (source-address lookup)", styleBaseline},
	"http":      {"bare net/http handler", styleHTTP},
	"spire":     {"SPIRE v1.13.3 Workload API", styleSPIRE},
}

func targetName(t string) (string, int) {
	if n, ok := targetNames[t]; ok {
		return n.name, n.style
	}
	return t, styleMedian
}

var modeNames = map[string]string{
	"keepalive": "keep-alive",
	"newconn":   "new connection per request",
	"same":      "audience repeated",
	"fresh":     "fresh audience per request",
}

func modeName(m string) string { return cmp.Or(modeNames[m], m) }

// loadKey is what a throughput or latency chart holds fixed.
type loadKey struct {
	alg, mode, audience string
	clients             int
	// active: the load came from this many of the N sandboxes (0: all).
	active int
}

// stormKey: a restart with the socket held (--hold-socket), or a start
// storm with shared clients (--storm-clients shared), is another experiment
// than one without, not another run of the same.
type stormKey struct {
	kind, alg string
	held      bool
	shared    bool
}

type spireKey struct{ alg, mode string }

// figures turns what was read into charts, in a stable order.
func figures(in inputs, warn io.Writer) []*figure {
	var out []*figure
	tput, p99 := map[loadKey]*figure{}, map[loadKey]*figure{}
	sign := map[loadKey][][3]float64{}
	storms := map[stormKey]*figure{}
	for _, nr := range in.results {
		r := nr.res
		c := r.Config
		audience := cmp.Or(c.Audience, "same")
		clients := max(c.Clients, 1)
		if s := r.Storm; s != nil {
			k := stormKey{s.Kind, c.Alg, c.HeldSocket, c.StormClients == "shared"}
			f := storms[k]
			if f == nil {
				file, held := fmt.Sprintf("storm-%s-%s", fileWord(s.Kind), fileWord(c.Alg)), ""
				if c.HeldSocket {
					file, held = file+"-held-socket", ", token socket held"
				}
				if k.shared {
					file, held = file+"-shared-clients", held+", clients in one process"
				}
				f = &figure{
					file:   file + ".svg",
					title:  fmt.Sprintf("%s storm, %s%s: time until the sandboxes have a token", s.Kind, c.Alg, held),
					xLabel: "sandboxes N (log)", yLabel: "seconds (log)",
				}
				storms[k] = f
				out = append(out, f)
			}
			n := float64(cmp.Or(s.Sandboxes, c.Sandboxes))
			if s.Served < s.Sandboxes {
				fmt.Fprintf(warn, "identity-bench chart: %s: only %d of %d sandboxes served; the times are those of the served ones\n", nr.path, s.Served, s.Sandboxes)
			}
			from := "after the storm began"
			if s.Kind == "restart" {
				from = "after the restarted daemon was ready"
			}
			if len(s.Targets) == 0 {
				f.line("last sandbox served, "+from, styleIdentityd).add(n, same3(s.Last))
				f.line("median sandbox", styleMedian).add(n, same3(s.P50))
			}
			// A start storm in rounds against several targets: the last
			// sandbox per target, min-max over the rounds.
			for _, t := range s.Targets {
				if t.Last[1] <= 0 {
					continue
				}
				name, style := targetName(t.Target)
				f.line(name+": last sandbox served", style).add(n, t.Last)
				if t.Target == "identityd" {
					f.line("identityd: median sandbox", styleMedian).add(n, t.P50)
				}
			}
			f.line("signature floor (N signatures over all cores)", styleFloor).add(n, same3(s.Floor))
			if s.FloorAllCores > 0 {
				f.line("N signatures at the all-cores sign-only rate", styleFloorMeasured).add(n, same3(s.FloorAllCores))
			}
			for _, t := range s.Targets {
				if t.Target == "http" && t.Last[1] > 0 {
					// What a storm cannot go below on these cores: the
					// clients' own exchanges, then the signatures.
					f.line("bare handler's last + signature floor", styleFloorWithClients).add(n, same3(t.Last[1]+s.Floor))
				}
			}
		}
		for _, s := range r.Summaries {
			// A --grow-to run measures two sizes in the same rounds: a
			// ratio of its own, not points of the series of runs by N.
			if s.Rounds == 0 || c.GrowTo > 0 {
				continue
			}
			k := loadKey{c.Alg, s.Mode, audience, clients, c.Active}
			ft, fp := tput[k], p99[k]
			if ft == nil {
				what := fmt.Sprintf("%s, %s, %s, %d client(s)/sandbox", c.Alg, modeName(s.Mode), modeName(audience), clients)
				base := fmt.Sprintf("%s-%s-%s-k%d", fileWord(c.Alg), fileWord(s.Mode), fileWord(audience), clients)
				if c.Active > 0 {
					what += fmt.Sprintf(", load from %d of them", c.Active)
					base += fmt.Sprintf("-active%d", c.Active)
				}
				base += ".svg"
				ft = &figure{file: "throughput-" + base, title: "Throughput: " + what,
					xLabel: "sandboxes N (log)", yLabel: "requests/s (log)"}
				fp = &figure{file: "p99-" + base, title: "p99 latency: " + what,
					xLabel: "sandboxes N (log)", yLabel: "p99, ms (log)"}
				tput[k], p99[k] = ft, fp
				out = append(out, ft, fp)
			}
			name, style := targetName(s.Target)
			n := float64(c.Sandboxes)
			ft.line(name, style).add(n, s.Throughput)
			fp.line(name, style).add(n, s.P99)
		}
		for _, s := range r.SignSummary {
			if s.Alg != c.Alg {
				continue
			}
			for _, m := range []string{"keepalive", "newconn"} {
				k := loadKey{c.Alg, m, audience, clients, c.Active}
				sign[k] = append(sign[k], s.Rate)
			}
		}
	}
	for k, f := range tput {
		if len(sign[k]) > 0 {
			f.hlines = append(f.hlines, hline{name: fmt.Sprintf("sign-only %s, all cores (median)", k.alg), style: styleFloor, y: combine(sign[k])[1]})
		}
	}

	spire := map[spireKey]map[string]map[int][]float64{} // system, K: per round
	var spireOrder []spireKey
	for _, s := range in.spire {
		k := spireKey{s.Alg, s.Mode}
		if spire[k] == nil {
			spire[k] = map[string]map[int][]float64{}
			spireOrder = append(spireOrder, k)
		}
		for _, v := range []struct {
			what string
			v    float64
		}{{"throughput", s.Throughput}, {"p99", s.P99}} {
			sk := s.System + "\x00" + v.what
			if spire[k][sk] == nil {
				spire[k][sk] = map[int][]float64{}
			}
			spire[k][sk][s.Clients] = append(spire[k][sk][s.Clients], v.v)
		}
	}
	for _, k := range spireOrder {
		what := fmt.Sprintf("identityd vs SPIRE, %s, %s", k.alg, modeName(k.mode))
		base := fmt.Sprintf("%s-%s.svg", fileWord(k.alg), fileWord(k.mode))
		ft := &figure{file: "spire-throughput-" + base, title: "Throughput: " + what,
			xLabel: "concurrent clients K (log)", yLabel: "tokens/s (log)"}
		fp := &figure{file: "spire-p99-" + base, title: "p99 latency: " + what,
			xLabel: "concurrent clients K (log)", yLabel: "p99, ms (log)"}
		for _, sys := range slices.Sorted(maps.Keys(spire[k])) {
			system, what, _ := strings.Cut(sys, "\x00")
			name, style := targetName(system)
			f := ft
			if what == "p99" {
				f = fp
			}
			for kk, vs := range spire[k][sys] {
				f.line(name, style).add(float64(kk), minMedMax(vs))
			}
		}
		out = append(out, ft, fp)
	}
	for _, f := range out {
		// identityd first, then the others in a fixed order, whatever the
		// order of the inputs.
		slices.SortStableFunc(f.series, func(a, b *series) int { return cmp.Compare(a.style, b.style) })
	}
	slices.SortStableFunc(out, func(a, b *figure) int { return cmp.Compare(a.file, b.file) })
	return out
}

func same3(v float64) [3]float64 { return [3]float64{v, v, v} }

// fileWord keeps a word from the inputs safe in a file name: the inputs are
// just files, and "../x" must not become a path.
func fileWord(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			b[i] = '_'
		}
	}
	return cmp.Or(string(b), "_")
}

// makeCharts reads paths and writes one SVG per chart into out; it returns
// the files written.
func makeCharts(out string, paths []string, warn io.Writer) ([]string, error) {
	figs := figures(readInputs(paths, warn), warn)
	if len(figs) == 0 {
		return nil, errors.New("nothing to chart: no identity-bench result or spire.sh line was read")
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, fmt.Errorf("make the output directory: %w", err)
	}
	var written []string
	var errs []error
	for _, f := range figs {
		b, err := f.svg(warn)
		if err != nil {
			errs = append(errs, fmt.Errorf("chart %s: %w", f.file, err))
			continue
		}
		path := filepath.Join(out, f.file)
		if err := atomicfile.WriteFile(path, b, 0o644); err != nil {
			errs = append(errs, fmt.Errorf("write %s: %w", path, err))
			continue
		}
		written = append(written, path)
	}
	return written, errors.Join(errs...)
}

const (
	chartWidth  = 8 * vg.Inch
	chartHeight = 5 * vg.Inch
)

// svg draws the figure: log axes both ways (N and K span decades; the
// figures' ratios matter more than their differences), each median a
// point on its line, the min-max of the inputs an error bar.
func (f *figure) svg(warn io.Writer) ([]byte, error) {
	p := plot.New()
	for _, st := range []*text.Style{&p.Title.TextStyle, &p.X.Label.TextStyle, &p.Y.Label.TextStyle,
		&p.X.Tick.Label, &p.Y.Tick.Label, &p.Legend.TextStyle} {
		st.Font.Typeface, st.Font.Variant = chartTypeface, chartVariant
	}
	p.Title.Text = f.title
	// Short y labels: plot centres the label's box at the mean of the
	// axis's ends, which a log axis puts near its top, and pushes the
	// data down by whatever of the box then sticks out.
	p.X.Label.Text, p.Y.Label.Text = f.xLabel, f.yLabel
	p.X.Scale, p.Y.Scale = plot.LogScale{}, plot.LogScale{}
	p.Legend.Top = true
	p.Legend.XOffs = -vg.Points(6)
	p.Legend.ThumbnailWidth = 0.4 * vg.Inch
	p.Add(plotter.NewGrid())

	// The x range is known before drawing: every x of every series.
	xmin, xmax := math.Inf(1), math.Inf(-1)
	for _, s := range f.series {
		for x := range s.at {
			if x > 0 {
				xmin, xmax = min(xmin, x), max(xmax, x)
			}
		}
	}
	if math.IsInf(xmin, 0) {
		return nil, errors.New("no point is drawable")
	}
	pad := 1.6
	if xmin == xmax {
		pad = 3
	}
	p.X.Min, p.X.Max = xmin/pad, xmax*pad
	// A hundredth of the axis's width per series, when there are bars to
	// keep apart.
	dodge := 0.0
	for _, s := range f.series {
		for x := range s.at {
			if v := s.point(x); v[0] != v[2] {
				dodge = 0.01 * math.Log10(p.X.Max/p.X.Min)
			}
		}
	}
	ymin, ymax := math.Inf(1), math.Inf(-1)
	var xticks []float64
	entries := 0
	for i, s := range f.series {
		// Lines side by side at one x would hide each other's bars: shift
		// each a little (a few percent on the log axis) around the true x.
		shift := math.Pow(10, dodge*(float64(i)-float64(len(f.series)-1)/2))
		var xys plotter.XYs
		var errs plotter.YErrors
		for _, x := range s.xs() {
			v := s.point(x)
			if !(x > 0) || !(v[1] > 0) || math.IsInf(v[1], 0) {
				fmt.Fprintf(warn, "identity-bench chart: %s: %s at %g is %g, not drawable on a log axis; left out\n", f.file, s.name, x, v[1])
				continue
			}
			lo := v[0]
			if !(lo > 0) {
				lo = v[1]
			}
			xys = append(xys, plotter.XY{X: x * shift, Y: v[1]})
			errs = append(errs, struct{ Low, High float64 }{Low: v[1] - lo, High: v[2] - v[1]})
			ymin, ymax = min(ymin, lo), max(ymax, v[2])
			if !slices.Contains(xticks, x) {
				xticks = append(xticks, x)
			}
		}
		if len(xys) == 0 {
			continue
		}
		st := seriesStyles[s.style]
		l, pts, err := plotter.NewLinePoints(xys)
		if err != nil {
			return nil, err
		}
		l.Color, l.Width = st.color, vg.Points(1.5)
		if st.dashed {
			l.Dashes = []vg.Length{vg.Points(5), vg.Points(3)}
		}
		pts.Color, pts.Shape, pts.Radius = st.color, st.glyph, vg.Points(3.5)
		eb, err := plotter.NewYErrorBars(struct {
			plotter.XYs
			plotter.YErrors
		}{xys, errs})
		if err != nil {
			return nil, err
		}
		eb.Color, eb.Width, eb.CapWidth = st.color, vg.Points(1), vg.Points(6)
		p.Add(l, pts, eb)
		p.Legend.Add(s.name, l, pts)
		entries++
	}
	if entries == 0 {
		return nil, errors.New("no point is drawable")
	}
	for _, h := range f.hlines {
		if h.y > 0 {
			ymin, ymax = min(ymin, h.y), max(ymax, h.y)
		}
	}
	// Room around the points, and at the top for the legend (a line of
	// text per entry, as a share of the plot's height).
	entries += len(f.hlines)
	legend := min(0.6, (float64(entries)*14+16)/(chartHeight.Points()-90))
	lmin, lmax := math.Log10(ymin/1.3), math.Log10(ymax*1.15)
	p.Y.Min, p.Y.Max = math.Pow(10, lmin), math.Pow(10, lmin+(lmax-lmin)/(1-legend))
	for _, h := range f.hlines {
		if !(h.y > 0) {
			continue
		}
		l, err := plotter.NewLine(plotter.XYs{{X: p.X.Min, Y: h.y}, {X: p.X.Max, Y: h.y}})
		if err != nil {
			return nil, err
		}
		st := seriesStyles[h.style]
		l.Color, l.Width, l.Dashes = st.color, vg.Points(1.5), []vg.Length{vg.Points(6), vg.Points(3)}
		p.Add(l)
		p.Legend.Add(h.name, l)
	}
	slices.Sort(xticks)
	p.X.Tick.Marker = plot.TickerFunc(func(_, _ float64) []plot.Tick {
		ts := make([]plot.Tick, len(xticks))
		for i, x := range xticks {
			ts[i] = plot.Tick{Value: x, Label: tickLabel(x)}
		}
		return ts
	})
	p.Y.Tick.Marker = plot.TickerFunc(logTicks)

	var buf bytes.Buffer
	w, err := p.WriterTo(chartWidth, chartHeight, "svg")
	if err != nil {
		return nil, err
	}
	if _, err := w.WriteTo(&buf); err != nil {
		return nil, err
	}
	// The SVG names the font the text was measured with; a viewer without
	// it falls back to its default font, often a wider serif that overflows
	// the legend and the title. Arial and Helvetica have Liberation Sans's
	// metrics.
	return bytes.ReplaceAll(buf.Bytes(), []byte("font-family:"+chartFamily+";"),
		[]byte("font-family:"+chartFamily+",Arial,Helvetica,sans-serif;")), nil
}

// The charts' font, as plot's font cache names it (gonum.org/v1/plot's
// Liberation collection) and as the SVG names its family.
const (
	chartTypeface = "Liberation"
	chartVariant  = "Sans"
	chartFamily   = "Liberation Sans"
)

// logTicks labels 1, 2 and 5 times the powers of ten when the axis spans
// less than three decades (plot.LogTicks labels only the powers, which can
// leave a short axis with one label or none), else the powers only.
func logTicks(lo, hi float64) []plot.Tick {
	var ts []plot.Tick
	labelled := []float64{1, 2, 5}
	if hi/lo >= 1000 {
		labelled = []float64{1}
	}
	for e := math.Floor(math.Log10(lo)); e <= math.Ceil(math.Log10(hi)); e++ {
		for m := 1.0; m < 10; m++ {
			v := m * math.Pow(10, e)
			if v < lo || v > hi {
				continue
			}
			t := plot.Tick{Value: v}
			if slices.Contains(labelled, m) {
				t.Label = tickLabel(v)
			}
			ts = append(ts, t)
		}
	}
	return ts
}

func tickLabel(v float64) string {
	if v >= 1e6 {
		return strconv.FormatFloat(v, 'g', 3, 64)
	}
	// Rounded to 6 significant digits first: 0.3 is 3*10^-1, not exactly.
	v, _ = strconv.ParseFloat(strconv.FormatFloat(v, 'g', 6, 64), 64)
	return strconv.FormatFloat(v, 'f', -1, 64)
}
