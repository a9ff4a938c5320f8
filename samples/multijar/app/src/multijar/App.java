package multijar;

import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.io.StringWriter;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import javax.xml.stream.XMLOutputFactory;
import javax.xml.stream.XMLStreamException;
import javax.xml.stream.XMLStreamWriter;

import jsonish.Json;
import textutil.Csv;
import textutil.Stats;

/**
 * The multi-jar sample: reads a CSV of cities embedded in the jar (with lib/textutil.jar), computes
 * population statistics, and prints them as JSON (with lib/jsonish.jar) or, with {@code --xml}, as
 * XML (java.xml). {@code --top N} sets how many of the largest cities are listed (default 3).
 * Exits 0; a bad argument exits 2.
 *
 * <p>JDK modules: java.base and java.xml from this jar, java.logging from lib/textutil.jar.
 */
public final class App {
    private App() {
    }

    public static void main(String[] args) throws IOException, XMLStreamException {
        boolean xml = false;
        int top = 3;
        for (int i = 0; i < args.length; i++) {
            if (args[i].equals("--xml")) {
                xml = true;
            } else if (args[i].equals("--top") && i + 1 < args.length) {
                top = Integer.parseInt(args[++i]);
            } else {
                System.err.println("usage: multijar [--xml] [--top N]");
                System.exit(2);
            }
        }
        Map<String, Object> report = report(load(), top);
        System.out.print(xml ? toXml(report) : Json.write(report));
        System.out.flush();
    }

    static List<Map<String, String>> load() throws IOException {
        try (InputStream in = App.class.getResourceAsStream("cities.csv")) {
            if (in == null) {
                throw new IOException("resource multijar/cities.csv is missing from the jar");
            }
            return Csv.read(new InputStreamReader(in, StandardCharsets.UTF_8));
        }
    }

    static Map<String, Object> report(List<Map<String, String>> cities, int top) {
        List<Long> populations = new ArrayList<>();
        Map<String, List<Long>> byCountry = new TreeMap<>();
        Map<String, String> northernmost = null;
        for (Map<String, String> city : cities) {
            long population = Long.parseLong(city.get("population"));
            populations.add(population);
            byCountry.computeIfAbsent(city.get("country"), k -> new ArrayList<>()).add(population);
            if (northernmost == null
                    || Double.parseDouble(city.get("latitude")) > Double.parseDouble(northernmost.get("latitude"))) {
                northernmost = city;
            }
        }
        Stats all = new Stats(populations);
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("cities", all.count());
        out.put("countries", byCountry.size());
        out.put("population", all.sum());
        out.put("mean", all.mean());
        out.put("median", all.median());
        out.put("northernmost", northernmost == null ? null : northernmost.get("name"));
        List<Map<String, String>> sorted = new ArrayList<>(cities);
        sorted.sort(Comparator.comparingLong((Map<String, String> c) -> Long.parseLong(c.get("population")))
                .reversed());
        List<Object> largest = new ArrayList<>();
        for (Map<String, String> city : sorted.subList(0, Math.min(top, sorted.size()))) {
            Map<String, Object> entry = new LinkedHashMap<>();
            entry.put("name", city.get("name"));
            entry.put("country", city.get("country"));
            entry.put("population", Long.parseLong(city.get("population")));
            largest.add(entry);
        }
        out.put("largest", largest);
        Map<String, Object> countries = new LinkedHashMap<>();
        for (Map.Entry<String, List<Long>> e : byCountry.entrySet()) {
            Stats s = new Stats(e.getValue());
            Map<String, Object> entry = new LinkedHashMap<>();
            entry.put("cities", s.count());
            entry.put("population", s.sum());
            countries.put(e.getKey(), entry);
        }
        out.put("by_country", countries);
        return out;
    }

    static String toXml(Map<String, Object> report) throws XMLStreamException {
        StringWriter text = new StringWriter();
        XMLStreamWriter w = XMLOutputFactory.newInstance().createXMLStreamWriter(text);
        w.writeStartDocument("UTF-8", "1.0");
        w.writeStartElement("report");
        for (String key : new String[] {"cities", "countries", "population", "mean", "median", "northernmost"}) {
            w.writeAttribute(key, String.valueOf(report.get(key)));
        }
        for (Object o : (List<?>) report.get("largest")) {
            Map<?, ?> city = (Map<?, ?>) o;
            w.writeEmptyElement("city");
            w.writeAttribute("name", String.valueOf(city.get("name")));
            w.writeAttribute("country", String.valueOf(city.get("country")));
            w.writeAttribute("population", String.valueOf(city.get("population")));
        }
        w.writeEndElement();
        w.writeEndDocument();
        w.close();
        return text + "\n";
    }
}
