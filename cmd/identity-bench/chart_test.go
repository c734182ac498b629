package main

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// loadJSON is an identity-bench result as --json-out writes it, reduced to
// what the charts read: identityd's keep-alive throughput and p99 are the
// given min/median/max, the other targets fixed figures.
func loadJSON(n, k int, alg, audience string, tput, p99 [3]float64) string {
	return fmt.Sprintf(`{
  "config": {"sandboxes": %d, "clients_per_sandbox": %d, "duration": "2s", "alg": %q, "audience": %q, "rounds": 3},
  "machine": {"cpus": 2},
  "summaries": [
    {"target": "identityd", "mode": "keepalive", "rounds": 3, "throughput_min_med_max": [%g, %g, %g], "p99_ms_min_med_max": [%g, %g, %g]},
    {"target": "baseline", "mode": "keepalive", "rounds": 3, "throughput_min_med_max": [4000, 4100, 4300], "p99_ms_min_med_max": [1, 1.1, 1.2]},
    {"target": "http", "mode": "keepalive", "rounds": 3, "throughput_min_med_max": [9000, 10000, 10500], "p99_ms_min_med_max": [0.2, 0.3, 0.4]},
    {"target": "identityd", "mode": "newconn", "rounds": 3, "throughput_min_med_max": [1600, 1800, 2000], "p99_ms_min_med_max": [1.4, 1.5, 2.2]}
  ],
  "sign_only_summary": [
    {"alg": "RS256", "rate_min_med_max": [260, 780, 820], "per_sign_us_median": 1400},
    {"alg": "ES256", "rate_min_med_max": [9000, 17000, 17100], "per_sign_us_median": 54}
  ]
}`, n, k, alg, audience, tput[0], tput[1], tput[2], p99[0], p99[1], p99[2])
}

func stormJSON(kind string, n int, alg string, last, p50, floor float64, served int) string {
	return fmt.Sprintf(`{
  "config": {"sandboxes": %d, "clients_per_sandbox": 1, "alg": %q, "audience": "same", "rounds": 1},
  "storm": {"kind": %q, "sandboxes": %d, "served": %d, "last_s": %g, "p50_s": %g, "sign_floor_s": %g, "per_sign_us": 322, "cores": 2}
}`, n, alg, kind, n, served, last, p50, floor)
}

// spireJSONL is bench/spire.sh's results.jsonl: per round and K, SPIRE and
// identityd, each audience mode; throughput is K*100*round for SPIRE and
// ten times that for identityd, p99 the round in ms.
func spireJSONL(alg string, rounds int, ks ...int) string {
	var b strings.Builder
	for round := 1; round <= rounds; round++ {
		for _, k := range ks {
			for _, mode := range []string{"same", "fresh"} {
				fmt.Fprintf(&b, `{"system":"spire","mode":%q,"clients":%d,"requests":10,"failures":0,"elapsed_s":3,"throughput":%d,"p50_ms":0.5,"p90_ms":0.8,"p99_ms":%d,"max_ms":10,"agent_cpu_s":2.5,"server_cpu_s":0,"cpu_us_per_request":548,"agent_peak_rss_mb":58,"server_peak_rss_mb":89,"alg":%q,"round":%d}`+"\n",
					mode, k, k*100*round, round, alg, round)
				fmt.Fprintf(&b, `{"system":"identityd","mode":%q,"clients":%d,"requests":10,"failures":0,"elapsed_s":3,"throughput":%d,"p50_ms":0.3,"p90_ms":0.4,"p99_ms":%d,"max_ms":5,"cpu_us_per_request":265,"peak_rss_mb":27,"alg":%q,"round":%d}`+"\n",
					mode, k, k*1000*round, round, alg, round)
			}
		}
	}
	return b.String()
}

// writeChartInputs writes a results directory: load runs of ES256 at N=1
// and N=10 (twice: two runs of one configuration), one with 4 clients, one
// with a fresh audience, two start storms, SPIRE lines, and files that are
// not results.
func writeChartInputs(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	files := map[string]string{
		"n1-k1-ES256.json":        loadJSON(1, 1, "ES256", "same", [3]float64{3000, 3300, 3400}, [3]float64{1.1, 1.2, 1.5}),
		"n10-k1-ES256.json":       loadJSON(10, 1, "ES256", "same", [3]float64{2000, 2500, 2600}, [3]float64{5, 6, 7}),
		"again/n10-k1-ES256.json": loadJSON(10, 1, "ES256", "same", [3]float64{2400, 2700, 3100}, [3]float64{4, 8, 9}),
		"n1-k4-ES256.json":        loadJSON(1, 4, "ES256", "same", [3]float64{4000, 4500, 5000}, [3]float64{2, 3, 4}),
		"n1-k1-ES256-fresh.json":  loadJSON(1, 1, "ES256", "fresh", [3]float64{2900, 3000, 3100}, [3]float64{1, 2, 3}),
		"start-n100-ES256.json":   stormJSON("start", 100, "ES256", 0.55, 0.47, 0.016, 100),
		"start-n1000-ES256.json":  stormJSON("start", 1000, "ES256", 2.5, 1.2, 0.16, 1000),
		"spire/results.jsonl":     spireJSONL("RS256", 3, 1, 4) + "{\"truncated\n",
		"n1-k1-ES256.txt":         "a table, not JSON; skipped without a word",
		"broken.json":             "{\"config\": {",
		"empty.json":              "{}",
		"evil.json":               loadJSON(1, 1, "../../evil", "same", [3]float64{1, 2, 3}, [3]float64{1, 2, 3}),
	}
	for name, text := range files {
		p := filepath.Join(dir, name)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, []byte(text), 0o644))
	}
	return dir
}

func figureByFile(figs []*figure, file string) *figure {
	for _, f := range figs {
		if f.file == file {
			return f
		}
	}
	return nil
}

func seriesByName(f *figure, name string) *series {
	for _, s := range f.series {
		if s.name == name {
			return s
		}
	}
	return nil
}

func TestChartFigures(t *testing.T) {
	dir := writeChartInputs(t)
	var warn bytes.Buffer
	in := readInputs([]string{dir, filepath.Join(dir, "missing.json")}, &warn)
	assert.Len(t, in.results, 8)
	assert.Len(t, in.spire, 3*2*2*2)
	for _, bad := range []string{"broken.json", "empty.json", "missing.json", "results.jsonl:25"} {
		assert.Contains(t, warn.String(), bad)
	}
	assert.NotContains(t, warn.String(), ".txt")

	warn.Reset()
	figs := figures(in, &warn)
	var files []string
	for _, f := range figs {
		files = append(files, f.file)
	}
	assert.Equal(t, []string{
		"p99-ES256-keepalive-fresh-k1.svg", "p99-ES256-keepalive-same-k1.svg", "p99-ES256-keepalive-same-k4.svg",
		"p99-ES256-newconn-fresh-k1.svg", "p99-ES256-newconn-same-k1.svg", "p99-ES256-newconn-same-k4.svg",
		"p99-______evil-keepalive-same-k1.svg", "p99-______evil-newconn-same-k1.svg",
		"spire-p99-RS256-fresh.svg", "spire-p99-RS256-same.svg", "spire-throughput-RS256-fresh.svg", "spire-throughput-RS256-same.svg",
		"storm-start-ES256.svg",
		"throughput-ES256-keepalive-fresh-k1.svg", "throughput-ES256-keepalive-same-k1.svg", "throughput-ES256-keepalive-same-k4.svg",
		"throughput-ES256-newconn-fresh-k1.svg", "throughput-ES256-newconn-same-k1.svg", "throughput-ES256-newconn-same-k4.svg",
		"throughput-______evil-keepalive-same-k1.svg", "throughput-______evil-newconn-same-k1.svg",
	}, files)

	// N=1 and N=10 on one chart; the two runs at N=10 combine into one
	// point: least minimum, median of the medians, greatest maximum.
	tp := figureByFile(figs, "throughput-ES256-keepalive-same-k1.svg")
	require.NotNil(t, tp)
	assert.Contains(t, tp.title, "ES256")
	assert.Contains(t, tp.title, "keep-alive")
	id := seriesByName(tp, "identityd")
	require.NotNil(t, id)
	assert.Equal(t, []float64{1, 10}, id.xs())
	assert.Equal(t, [3]float64{3000, 3300, 3400}, id.point(1))
	assert.Equal(t, [3]float64{2000, 2600, 3100}, id.point(10))
	assert.Equal(t, "identityd", tp.series[0].name, "identityd first")
	assert.Len(t, tp.series, 3)
	// The sign-only rate of the run's algorithm, not another's.
	require.Len(t, tp.hlines, 1)
	assert.Equal(t, 17000.0, tp.hlines[0].y)
	assert.Contains(t, tp.hlines[0].name, "ES256")

	p99 := figureByFile(figs, "p99-ES256-keepalive-same-k1.svg")
	require.NotNil(t, p99)
	assert.Equal(t, [3]float64{4, 7, 9}, seriesByName(p99, "identityd").point(10))
	assert.Empty(t, p99.hlines)

	// A single N still makes a chart.
	k4 := figureByFile(figs, "throughput-ES256-keepalive-same-k4.svg")
	require.NotNil(t, k4)
	assert.Equal(t, []float64{1}, seriesByName(k4, "identityd").xs())

	st := figureByFile(figs, "storm-start-ES256.svg")
	require.NotNil(t, st)
	require.Len(t, st.series, 3)
	assert.Equal(t, []float64{100, 1000}, st.series[0].xs())
	assert.Equal(t, [3]float64{2.5, 2.5, 2.5}, st.series[0].point(1000))
	assert.Equal(t, [3]float64{1.2, 1.2, 1.2}, st.series[1].point(1000))
	assert.Equal(t, [3]float64{0.16, 0.16, 0.16}, st.series[2].point(1000))

	// SPIRE: min, median and max over the rounds at each K.
	sp := figureByFile(figs, "spire-throughput-RS256-fresh.svg")
	require.NotNil(t, sp)
	assert.Contains(t, sp.title, "SPIRE")
	require.Len(t, sp.series, 2)
	assert.Equal(t, "identityd", sp.series[0].name)
	assert.Equal(t, []float64{1, 4}, sp.series[0].xs())
	assert.Equal(t, [3]float64{4000, 8000, 12000}, sp.series[0].point(4))
	assert.Equal(t, [3]float64{400, 800, 1200}, sp.series[1].point(4))
	sp99 := figureByFile(figs, "spire-p99-RS256-same.svg")
	require.NotNil(t, sp99)
	assert.Equal(t, [3]float64{1, 2, 3}, sp99.series[1].point(1))
}

func TestChartStormNotAllServed(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "r.json"), []byte(stormJSON("restart", 100, "RS256", 3, 1, 0.05, 97)), 0o644))
	var warn bytes.Buffer
	figs := figures(readInputs([]string{dir}, &warn), &warn)
	require.Len(t, figs, 1)
	assert.Equal(t, "storm-restart-RS256.svg", figs[0].file)
	assert.Contains(t, warn.String(), "only 97 of 100")
}

// Restart storms with the token socket held are charted apart from those
// without.
func TestChartStormHeldSocket(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "a.json"), []byte(stormJSON("restart", 100, "RS256", 3, 1, 0.05, 100)), 0o644))
	held := strings.Replace(stormJSON("restart", 100, "RS256", 0.5, 0.2, 0.05, 100), `"rounds": 1`, `"rounds": 1, "held_socket": true`, 1)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "b.json"), []byte(held), 0o644))
	figs := figures(readInputs([]string{dir}, io.Discard), io.Discard)
	require.Len(t, figs, 2)
	assert.Equal(t, "storm-restart-RS256-held-socket.svg", figs[0].file)
	assert.Contains(t, figs[0].title, "socket held")
	assert.Equal(t, [3]float64{0.5, 0.5, 0.5}, figs[0].series[0].point(100))
	assert.Equal(t, "storm-restart-RS256.svg", figs[1].file)
	assert.Equal(t, [3]float64{3, 3, 3}, figs[1].series[0].point(100))
}

// svgTexts parses an SVG as XML and returns the text of its <text>
// elements.
func svgTexts(t *testing.T, path string) []string {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	var texts []string
	d := xml.NewDecoder(f)
	inText := false
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err, "%s is not XML", path)
		switch tok := tok.(type) {
		case xml.StartElement:
			inText = tok.Name.Local == "text"
		case xml.CharData:
			if inText {
				texts = append(texts, string(tok))
			}
		case xml.EndElement:
			inText = false
		}
	}
	return texts
}

func TestChartWritesSVG(t *testing.T) {
	dir := writeChartInputs(t)
	out := filepath.Join(t.TempDir(), "charts")
	var warn bytes.Buffer
	written, err := makeCharts(out, []string{dir}, &warn)
	require.NoError(t, err)
	figs := figures(readInputs([]string{dir}, io.Discard), io.Discard)
	require.Len(t, written, len(figs))
	entries, err := os.ReadDir(out)
	require.NoError(t, err)
	require.Len(t, entries, len(figs), "every chart, in the output directory and nowhere else")
	for _, f := range figs {
		path := filepath.Join(out, f.file)
		assert.Contains(t, written, path)
		texts := svgTexts(t, path)
		assert.Contains(t, texts, f.title, f.file)
		assert.Contains(t, texts, f.yLabel, f.file)
		for _, s := range f.series {
			assert.Contains(t, texts, s.name, "%s: legend", f.file)
		}
		b, err := os.ReadFile(path)
		require.NoError(t, err)
		assert.Contains(t, string(b), "font-family:Liberation Sans,Arial,Helvetica,sans-serif;")
	}
	texts := svgTexts(t, filepath.Join(out, "throughput-ES256-keepalive-same-k1.svg"))
	assert.Contains(t, texts, "sign-only ES256, all cores (median)")
	for _, x := range []string{"1", "10"} {
		assert.True(t, slices.Contains(texts, x), "x tick %s", x)
	}
}

func TestChartNothingReadable(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "a.json"), []byte("[1, 2"), 0o644))
	var warn bytes.Buffer
	out := filepath.Join(t.TempDir(), "charts")
	_, err := makeCharts(out, []string{dir}, &warn)
	require.Error(t, err)
	assert.Contains(t, warn.String(), "a.json")
	_, err = os.Stat(out)
	assert.True(t, os.IsNotExist(err), "no output directory when there is nothing to draw")
}

// A result whose figures are zero (every request failed) cannot go on a log
// axis: it is left out with a warning, the rest is drawn.
func TestChartZeroFigures(t *testing.T) {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "a.json"),
		[]byte(loadJSON(1, 1, "ES256", "same", [3]float64{0, 0, 0}, [3]float64{0, 0, 0})), 0o644))
	var warn bytes.Buffer
	written, err := makeCharts(t.TempDir(), []string{dir}, &warn)
	require.NoError(t, err)
	assert.Len(t, written, 4)
	assert.Contains(t, warn.String(), "left out")
}
