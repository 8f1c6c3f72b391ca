"""IP → country, ASN and anonymiser flags behind the :class:`gateway.geo.base.GeoProvider` seam."""
